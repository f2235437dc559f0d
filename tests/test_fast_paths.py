"""Fast paths and memory switches leave what is computed unchanged.

Activation checkpointing (Hiera blocks, memory-attention layers, a whole SAM2Train step), the
frozen image encoder run without autograd, and compilation applied from outside. Models run in
training mode with dropout and drop-path on: checkpointing must replay the same random masks.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.sam2_train_setup import (
    MODEL,
    batch_tensors,
    datapoint,
    loss_and_grads,
    visible_model,
)
from training.engine.parallelize import apply_training_optimizations, is_checkpointed

EXACT = {"rtol": 0.0, "atol": 0.0}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def _assert_same_grads(ours: dict, theirs: dict, **tol) -> None:
    assert ours.keys() == theirs.keys()
    for name, grad in ours.items():
        assert (grad is None) == (theirs[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grad, theirs[name], msg=name, **tol)


def _forward_backward(module: torch.nn.Module, run, seed: int = 5):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = run(module)
    # A loss that weighs every output element differently, so no gradient cancels out.
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), _grads(module)


def _tiny_hiera() -> torch.nn.Module:
    trunk = {**MODEL["image_encoder"]["trunk"], "drop_path_rate": 0.3}
    torch.manual_seed(0)
    return instantiate(trunk).train()


def test_checkpointed_hiera_blocks_give_equal_outputs_and_gradients():
    plain = _tiny_hiera()
    checkpointed = copy.deepcopy(plain)
    apply_training_optimizations(checkpointed, activation_checkpointing=[])  # no-op
    assert not any(is_checkpointed(b) for b in checkpointed.blocks)
    # A bare trunk has no `image_encoder`; wrap the blocks through the helper's path.
    holder = torch.nn.Module()
    holder.image_encoder = torch.nn.Module()
    holder.image_encoder.trunk = checkpointed
    apply_training_optimizations(holder, activation_checkpointing=["image_encoder"])
    assert all(is_checkpointed(b) for b in checkpointed.blocks)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()

    images = torch.randn(2, 3, 64, 64)
    run = lambda m: torch.cat([f.flatten() for f in m(images)])
    out_plain, grads_plain = _forward_backward(plain, run)
    out_ckpt, grads_ckpt = _forward_backward(checkpointed, run)
    torch.testing.assert_close(out_ckpt, out_plain, **EXACT)
    _assert_same_grads(grads_ckpt, grads_plain, **EXACT)


def test_checkpointed_memory_attention_layers_give_equal_outputs_and_gradients():
    torch.manual_seed(0)
    plain = instantiate(MODEL["memory_attention"], _convert_="all").train()  # dropout 0.1
    holder = torch.nn.Module()
    holder.memory_attention = copy.deepcopy(plain)
    apply_training_optimizations(holder, activation_checkpointing=["memory_attention"])
    assert all(is_checkpointed(layer) for layer in holder.memory_attention.layers)

    gen = torch.Generator().manual_seed(1)
    curr, curr_pos = torch.randn(16, 2, 32, generator=gen), torch.randn(16, 2, 32, generator=gen)
    memory, memory_pos = torch.randn(3 * 16 + 4, 2, 16, generator=gen), torch.randn(3 * 16 + 4, 2, 16, generator=gen)
    curr.requires_grad_(True)

    def run(m):
        return m(curr=curr, curr_pos=curr_pos, memory=memory, memory_pos=memory_pos, num_obj_ptr_tokens=4)

    out_plain, grads_plain = _forward_backward(plain, run)
    curr_grad_plain, curr.grad = curr.grad.clone(), None
    out_ckpt, grads_ckpt = _forward_backward(holder.memory_attention, run)
    torch.testing.assert_close(out_ckpt, out_plain, **EXACT)
    _assert_same_grads(grads_ckpt, grads_plain, **EXACT)
    torch.testing.assert_close(curr.grad, curr_grad_plain, **EXACT)


def _train_step(model, seed: int = 11):
    torch.manual_seed(seed)
    model.rng = __import__("numpy").random.default_rng(42)
    frames, losses = loss_and_grads(model, datapoint(batch_tensors()))
    masks = torch.stack([f["pred_masks_high_res"].detach() for f in frames])
    return masks, losses["core_loss"].detach(), _grads(model)


def test_checkpointed_sam2train_step_gives_equal_outputs_losses_and_gradients():
    plain = visible_model().train()
    checkpointed = apply_training_optimizations(copy.deepcopy(plain), activation_checkpointing=True)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    assert all(is_checkpointed(b) for b in checkpointed.image_encoder.trunk.blocks)
    assert all(is_checkpointed(layer) for layer in checkpointed.memory_attention.layers)

    masks_plain, loss_plain, grads_plain = _train_step(plain)
    masks_ckpt, loss_ckpt, grads_ckpt = _train_step(checkpointed)
    torch.testing.assert_close(masks_ckpt, masks_plain, **EXACT)
    torch.testing.assert_close(loss_ckpt, loss_plain, **EXACT)
    _assert_same_grads(grads_ckpt, grads_plain, **EXACT)
    assert all(g is not None for n, g in grads_ckpt.items() if n.startswith("image_encoder.trunk.blocks"))


def test_skipping_the_last_frames_memory_changes_no_loss_or_gradient():
    skipping = visible_model().train()
    encoding = copy.deepcopy(skipping)

    def track_encoding_every_memory(backbone_out, input):
        # `return_dict=True` encodes every frame's memory, as the official trainer does.
        bank = type(encoding).forward_tracking(encoding, backbone_out, input, return_dict=True)
        by_frame = {**bank["cond_frame_outputs"], **bank["non_cond_frame_outputs"]}
        return [by_frame[t] for t in sorted(by_frame)]

    encoding.forward_tracking = track_encoding_every_memory
    seen = {}

    def record(model, key):
        forward = model.forward
        model.forward = lambda batch: seen.setdefault(key, forward(batch))

    record(skipping, "skipping")
    record(encoding, "encoding")
    masks_skip, loss_skip, grads_skip = _train_step(skipping)
    masks_enc, loss_enc, grads_enc = _train_step(encoding)
    assert seen["encoding"][-1]["maskmem_features"] is not None
    assert seen["skipping"][-1]["maskmem_features"] is None
    assert all(frame["maskmem_features"] is not None for frame in seen["skipping"][:-1])
    torch.testing.assert_close(masks_skip, masks_enc, **EXACT)
    torch.testing.assert_close(loss_skip, loss_enc, **EXACT)
    _assert_same_grads(grads_skip, grads_enc, **EXACT)


def test_checkpointing_is_skipped_without_autograd():
    model = apply_training_optimizations(visible_model().eval(), activation_checkpointing=True)
    with torch.no_grad():
        features = model.forward_image(batch_tensors()["img_batch"][:, 0])
    assert features["vision_features"].grad_fn is None


def test_unknown_checkpoint_part_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="memory_attention"):
        apply_training_optimizations(visible_model(), activation_checkpointing=["mask_decoder"])


def test_frozen_image_encoder_runs_without_autograd_and_changes_nothing_else():
    plain = visible_model().train()
    frozen = visible_model(freeze_image_encoder=True).train()
    frozen.load_state_dict(plain.state_dict())
    assert frozen._image_encoder_is_frozen() and not plain._image_encoder_is_frozen()

    features = frozen.forward_image(batch_tensors()["img_batch"][:, 0])
    # No graph through the encoder; the decoder's high-res projections still train.
    assert features["vision_features"].grad_fn is None
    assert all(pos.grad_fn is None for pos in features["vision_pos_enc"])
    assert features["backbone_fpn"][0].grad_fn is not None

    masks_plain, loss_plain, grads_plain = _train_step(plain)
    masks_frozen, loss_frozen, grads_frozen = _train_step(frozen)
    torch.testing.assert_close(masks_frozen, masks_plain, **EXACT)
    torch.testing.assert_close(loss_frozen, loss_plain, **EXACT)
    for name, grad in grads_frozen.items():
        if name.startswith("image_encoder."):
            assert grad is None, name
        else:
            assert (grad is None) == (grads_plain[name] is None), name
            if grad is not None:
                torch.testing.assert_close(grad, grads_plain[name], msg=name, **EXACT)


def test_compile_image_encoder_is_recorded_not_applied_by_the_model():
    model = visible_model(compile_image_encoder=True)
    assert model.compile_image_encoder is True
    assert "forward" not in model.image_encoder.__dict__ and model.image_encoder._compiled_call_impl is None


def test_compile_switches_build_with_unchanged_names():
    model = visible_model(compile_image_encoder=True).eval()
    names = list(model.state_dict())
    # The eager backend checks the wiring in milliseconds; the inductor run is the slow test below.
    apply_training_optimizations(model, compile_memory_attention=True, compile_options={"backend": "eager"})
    assert model.image_encoder._compiled_call_impl is not None
    assert model.memory_attention._compiled_call_impl is not None
    assert list(model.state_dict()) == names
    images = batch_tensors()["img_batch"][:, 0]
    with torch.no_grad():
        compiled = model.forward_image(images)["vision_features"]
        model.image_encoder._compiled_call_impl = None
        eager = model.forward_image(images)["vision_features"]
    torch.testing.assert_close(compiled, eager, **EXACT)


def test_compiled_image_encoder_trains_on_without_recompiling():
    """After the first step the compiled image encoder is reused: its sine grids are built inside
    the graph, not read from the cache (a graph that read the cache its own first trace filled
    recompiled on the next step: a second full compile of the encoder)."""
    model = visible_model(compile_image_encoder=True).train()
    apply_training_optimizations(model, compile_options={"backend": "eager"})
    batch = datapoint(batch_tensors())
    torch._dynamo.reset()
    loss_and_grads(model, batch)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            loss_and_grads(model, batch)
    assert not model.image_encoder.neck.position_encoding.cache


@pytest.mark.parametrize("attend_padding", [False, True], ids=["cpu_windows", "gpu_windows"])
def test_compiled_hiera_trains_like_eager(attend_padding, monkeypatch):
    """Hiera compiled as `compile_image_encoder` compiles it (static shapes), traced forward and
    backward through AOTAutograd (its custom autograd Functions included; no C++ compiler
    needed), on a 112 px input whose windows padding cuts, on both padded-window paths (the
    CPU's, and the one batch a GPU runs): same features and gradients as eager, no graph break."""
    from torch._dynamo.utils import counters

    from sam2.modeling.backbones.hieradet import MultiScaleAttention

    monkeypatch.setattr(MultiScaleAttention, "attend_padding", attend_padding)
    eager = visible_model().image_encoder.trunk.train()
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager", dynamic=False)
    torch._dynamo.reset()
    counters.clear()
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    results = []
    for trunk in (compiled, eager):
        features = trunk(images.clone().requires_grad_())
        sum(f.square().mean() for f in features).backward()
        results.append([f.detach() for f in features] + [p.grad for p in trunk.parameters()])
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_inductor_compiled_image_encoder_matches_eager():
    model = visible_model().eval()
    images = batch_tensors()["img_batch"][:2, 0]
    with torch.no_grad():
        eager = model.forward_image(images)["vision_features"]
    apply_training_optimizations(model, compile_image_encoder=True)
    start = time.monotonic()
    try:
        with torch.no_grad():
            compiled = model.forward_image(images)["vision_features"]
    except Exception as error:  # noqa: BLE001 - any inductor failure here means no C++ toolchain
        pytest.skip(f"torch.compile (inductor) unavailable here: {type(error).__name__}: {error}"[:300])
    if time.monotonic() - start > 120:
        pytest.skip("inductor compilation took over 2 minutes on this machine")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)



@pytest.mark.slow
def test_compiled_memory_attention_trains_like_eager_as_the_memory_grows():
    """The compiled memory attention (`compile_memory_attention`) traces the rotary Functions with
    dynamic shapes and without graph breaks: 1, 3, 1, then 2 memory frames plus pointer tokens, forward
    and backward, through AOTAutograd (no C++ compiler needed). Two graphs serve every memory
    size: one for a single memory frame (a size 1 is always specialized), one for any other; the
    rotary tables are built inside them, whatever the tables' cache holds."""
    from torch._dynamo.utils import counters

    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.position_encoding import AxialRotaryTables
    from sam2.modeling.sam.transformer import RoPEAttention

    torch.manual_seed(0)
    rope = {"embedding_dim": 32, "num_heads": 2, "feat_sizes": (4, 4)}
    layer = MemoryAttentionLayer(
        d_model=32, self_attention=RoPEAttention(**rope),
        cross_attention=RoPEAttention(**rope, rope_k_repeat=True, kv_in_dim=16), dim_feedforward=64,
        activation="relu", dropout=0.0, pos_enc_at_attn=False, pos_enc_at_cross_attn_queries=False,
        pos_enc_at_cross_attn_keys=True,
    )  # fmt: skip
    eager = MemoryAttention(d_model=32, pos_enc_at_input=True, layer=layer, num_layers=1).train()
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager", dynamic=True)  # as compile_memory_attention does, CPU-only backend
    torch._dynamo.reset()
    counters.clear()
    AxialRotaryTables._tables.clear()  # cold, as in a new process
    for frames in (1, 3, 1, 2):
        gen = torch.Generator().manual_seed(frames)
        curr, pos = torch.randn(2, 16, 2, 32, generator=gen)
        memory, memory_pos = torch.randn(2, 16 * frames + 4, 2, 16, generator=gen)
        results = []
        for module in (compiled, eager):  # the compiled one first: it meets the cache cold
            module.zero_grad(set_to_none=True)
            inputs = [t.clone().requires_grad_() for t in (curr, memory)]
            out = module(inputs[0], inputs[1], curr_pos=pos, memory_pos=memory_pos, num_obj_ptr_tokens=4)
            out.square().sum().backward()
            results.append([out.detach(), *(t.grad for t in inputs), *(p.grad for p in module.parameters())])
        torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2

def test_compile_modules_names_the_models_parts():
    model = visible_model()
    with pytest.raises(ValueError, match=r"'mask_decoder'.*not a part of SAM2Train.*'sam_mask_decoder'"):
        apply_training_optimizations(model, compile_modules=["mask_decoder"])
    with pytest.raises(ValueError, match="compile_image_encoder"):
        apply_training_optimizations(model, compile_modules=["image_encoder"])
    apply_training_optimizations(model, compile_modules="sam_mask_decoder", compile_options={"backend": "eager"})
    assert model.sam_mask_decoder._compiled_call_impl is not None and model.memory_encoder._compiled_call_impl is None


@pytest.mark.slow
def test_compiled_heads_train_like_eager_without_graph_breaks():
    """`compile_modules` with the parts that run once per frame or click: same losses and
    gradients as eager over steps with different prompts, no graph break, and a bounded set of
    graphs (prompt kinds and counts, multimask or not, input layouts). The eager backend checks
    the capture in seconds."""
    from torch._dynamo.utils import counters

    heads = ["sam_prompt_encoder", "sam_mask_decoder", "memory_encoder"]
    eager, compiled = visible_model().train(), visible_model().train()
    apply_training_optimizations(compiled, compile_modules=heads, compile_options={"backend": "eager"})
    assert all(getattr(compiled, name)._compiled_call_impl is not None for name in heads)
    batch = datapoint(batch_tensors())
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for seed in range(4):
        results = []
        for model in (eager, compiled):
            torch.manual_seed(seed)
            _, losses = loss_and_grads(model, batch)
            results.append((losses, _grads(model)))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
        _assert_same_grads(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # 11 graphs over these four steps' prompt layouts; a grid read from a cache that the graph's
    # own trace filled added a twelfth (the memory encoder's, retraced on the next step).
    assert graphs[-1] <= 11, graphs


def test_cpu_optimizer_is_fused_and_steps_like_the_single_tensor_one():
    from tests.test_optimizer import _mose_optim, _tiny_model
    from training.optimizer import construct_optimizer

    conf = OmegaConf.create(_mose_optim())
    unfused = OmegaConf.merge(conf.optimizer, {"foreach": False})
    models = [_tiny_model(), _tiny_model()]
    fused = construct_optimizer(models[0], conf.optimizer, conf.options, conf.param_group_modifiers)
    plain = construct_optimizer(models[1], unfused, conf.options, conf.param_group_modifiers)
    assert fused.optimizer.defaults["fused"] is True and not plain.optimizer.defaults["fused"]
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        inputs = torch.randn(2, 3, 8, 8, generator=gen)
        for model, optim in zip(models, (fused, plain)):
            optim.optimizer.zero_grad(set_to_none=True)
            model(inputs).backward()
            optim.step(where=0.1 * step, step=step)
    for (name, ours), theirs in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)
