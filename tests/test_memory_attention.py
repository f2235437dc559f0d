from __future__ import annotations

import inspect

import pytest
import torch

from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.sam.transformer import RoPEAttention
from tests.reference import assert_close

D_MODEL, KV_DIM, SIDE, BATCH, NUM_FRAMES, NUM_PTR_TOKENS = 32, 16, 8, 2, 3, 4
NUM_CURR, NUM_SPATIAL = SIDE * SIDE, NUM_FRAMES * SIDE * SIDE

# "config_like" follows the official configs' flags; "all_pos" flips every positional-encoding
# switch and the activation so each branch of the layer is exercised.
VARIANTS = {
    "config_like": dict(
        activation="relu", pos_enc_at_input=True, pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
    ),
    "all_pos": dict(
        activation="gelu", pos_enc_at_input=False, pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=True,
    ),
}  # fmt: skip


def _inputs() -> dict[str, torch.Tensor]:
    """Sequence-first tensors: current tokens [N, B, C], memory [M, B, kv] with pointer tokens last."""
    gen = torch.Generator().manual_seed(0)
    num_memory = NUM_SPATIAL + NUM_PTR_TOKENS
    return {
        "curr": torch.randn(NUM_CURR, BATCH, D_MODEL, generator=gen),
        "curr_pos": torch.randn(NUM_CURR, BATCH, D_MODEL, generator=gen),
        "memory": torch.randn(num_memory, BATCH, KV_DIM, generator=gen),
        "memory_pos": torch.randn(num_memory, BATCH, KV_DIM, generator=gen),
        "grad_weight": torch.randn(NUM_CURR, BATCH, D_MODEL, generator=gen),
    }


def _build(module_ns: dict, flags: dict) -> torch.nn.Module:
    """The tiny model from either side's classes (the snippet passes the reference's)."""
    rope = dict(rope_theta=10000.0, feat_sizes=(SIDE, SIDE), embedding_dim=D_MODEL, num_heads=2, downsample_rate=1)
    layer = module_ns["MemoryAttentionLayer"](
        activation=flags["activation"],
        cross_attention=module_ns["RoPEAttention"](**rope, dropout=0.1, rope_k_repeat=True, kv_in_dim=KV_DIM),
        d_model=D_MODEL,
        dim_feedforward=64,
        dropout=0.1,
        pos_enc_at_attn=flags["pos_enc_at_attn"],
        pos_enc_at_cross_attn_keys=flags["pos_enc_at_cross_attn_keys"],
        pos_enc_at_cross_attn_queries=flags["pos_enc_at_cross_attn_queries"],
        self_attention=module_ns["RoPEAttention"](**rope, dropout=0.1),
    )
    return module_ns["MemoryAttention"](
        d_model=D_MODEL, pos_enc_at_input=flags["pos_enc_at_input"], layer=layer, num_layers=2
    ).eval()


_REFERENCE_SNIPPET = """
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.sam.transformer import RoPEAttention

namespace = dict(torch=torch, **inputs["constants"])
exec(inputs["build_source"], namespace)
_build = namespace["_build"]
classes = dict(MemoryAttention=MemoryAttention, MemoryAttentionLayer=MemoryAttentionLayer, RoPEAttention=RoPEAttention)
x = {k: inputs[k] for k in ("curr", "curr_pos", "memory", "memory_pos")}
spatial = inputs["num_spatial"]
torch.manual_seed(0)
for name, flags in inputs["variants"].items():
    model = _build(classes, flags)
    # Norms start at identity: noise makes their weights matter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    outputs[name + "_sd"] = model.state_dict()
    with torch.no_grad():
        outputs[name + "_with_ptrs"] = model(num_obj_ptr_tokens=inputs["num_ptr_tokens"], **x)
        outputs[name + "_frames_only"] = model(
            curr=[x["curr"]], curr_pos=[x["curr_pos"]],
            memory=x["memory"][:spatial], memory_pos=x["memory_pos"][:spatial],
        )
    if name == "config_like":
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        out = model(num_obj_ptr_tokens=inputs["num_ptr_tokens"], **leaves)
        (out * inputs["grad_weight"]).sum().backward()
        outputs["input_grads"] = {k: v.grad for k, v in leaves.items()}
        outputs["param_grads"] = {n: p.grad for n, p in model.named_parameters()}
    # Training mode: dropout on the residual branches, in the feed-forward block and on attention.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    out = model.train()(num_obj_ptr_tokens=inputs["num_ptr_tokens"], **leaves)
    (out * inputs["grad_weight"]).sum().backward()
    outputs[name + "_train"] = (out.detach(), {k: v.grad for k, v in leaves.items()}, {n: p.grad for n, p in model.named_parameters()})

cfg = OmegaConf.load(inputs["tiny_config"])
full = instantiate(cfg.model.memory_attention, _recursive_=True)
outputs["tiny_shapes"] = {k: (tuple(v.shape), v.dtype) for k, v in full.state_dict().items()}
"""


@pytest.fixture(scope="module")
def ref_out(reference):
    x = _inputs()
    return reference.run(
        _REFERENCE_SNIPPET,
        build_source=inspect.getsource(_build),
        constants=dict(SIDE=SIDE, D_MODEL=D_MODEL, KV_DIM=KV_DIM),
        variants=VARIANTS,
        num_spatial=NUM_SPATIAL,
        num_ptr_tokens=NUM_PTR_TOKENS,
        tiny_config=str(reference.root / "sam2" / "configs" / "sam2.1" / "sam2.1_hiera_t.yaml"),
        **x,
    )


_OURS = dict(MemoryAttention=MemoryAttention, MemoryAttentionLayer=MemoryAttentionLayer, RoPEAttention=RoPEAttention)


def _loaded(variant: str, ref_out) -> MemoryAttention:
    model = _build(_OURS, VARIANTS[variant])
    model.load_state_dict(ref_out[f"{variant}_sd"], strict=True)
    return model


def _model_inputs() -> dict[str, torch.Tensor]:
    return {k: v for k, v in _inputs().items() if k != "grad_weight"}


@pytest.mark.reference
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference_with_object_pointer_tokens(variant, ref_out):
    model = _loaded(variant, ref_out)
    with torch.no_grad():
        out = model(num_obj_ptr_tokens=NUM_PTR_TOKENS, **_model_inputs())
    assert out.shape == (NUM_CURR, BATCH, D_MODEL)
    assert_close(out, ref_out[f"{variant}_with_ptrs"])


@pytest.mark.reference
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference_with_frames_only_and_list_inputs(variant, ref_out):
    model, x = _loaded(variant, ref_out), _model_inputs()
    with torch.no_grad():
        out = model(
            curr=[x["curr"]],
            curr_pos=[x["curr_pos"]],
            memory=x["memory"][:NUM_SPATIAL],
            memory_pos=x["memory_pos"][:NUM_SPATIAL],
        )
    assert_close(out, ref_out[f"{variant}_frames_only"])


@pytest.mark.reference
def test_pointer_tokens_are_not_rotated(ref_out):
    """Counting the pointer tokens as spatial would rotate them and change the output."""
    model = _loaded("config_like", ref_out)
    x = _model_inputs()
    memory = torch.cat([x["memory"][:NUM_SPATIAL], x["memory"][:NUM_CURR]])
    memory_pos = torch.cat([x["memory_pos"][:NUM_SPATIAL], x["memory_pos"][:NUM_CURR]])
    with torch.no_grad():
        excluded = model(x["curr"], memory, x["curr_pos"], memory_pos, num_obj_ptr_tokens=NUM_CURR)
        rotated = model(x["curr"], memory, x["curr_pos"], memory_pos, num_obj_ptr_tokens=0)
    assert not torch.allclose(excluded, rotated, atol=1e-3)


@pytest.mark.reference
def test_gradients_match_reference(ref_out):
    model, x = _loaded("config_like", ref_out), _inputs()
    leaves = {k: x[k].clone().requires_grad_() for k in ("curr", "curr_pos", "memory", "memory_pos")}
    out = model(num_obj_ptr_tokens=NUM_PTR_TOKENS, **leaves)
    (out * x["grad_weight"]).sum().backward()
    assert_close({k: v.grad for k, v in leaves.items()}, ref_out["input_grads"])
    # Weight gradients sum over all tokens of the batch; their order of summation depends on the
    # thread count, so compare relative to each gradient's magnitude.
    for name, param in model.named_parameters():
        expected = ref_out["param_grads"][name]
        assert_close(param.grad, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), path=name)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.reference
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_mode_draws_the_same_dropout_and_gradients_as_reference(variant, ref_out):
    model, x = _loaded(variant, ref_out).train(), _inputs()
    leaves = {k: x[k].clone().requires_grad_() for k in ("curr", "curr_pos", "memory", "memory_pos")}
    torch.manual_seed(7)
    out = model(num_obj_ptr_tokens=NUM_PTR_TOKENS, **leaves)
    (out * x["grad_weight"]).sum().backward()
    ref_out_train, ref_input_grads, ref_param_grads = ref_out[f"{variant}_train"]
    assert_close(out, ref_out_train)
    assert_close({k: v.grad for k, v in leaves.items()}, ref_input_grads)
    for name, param in model.named_parameters():
        expected = ref_param_grads[name]
        assert_close(param.grad, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), path=name)


@pytest.mark.reference
def test_full_size_tiny_config_has_reference_state_dict(reference, ref_out):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(reference.root / "sam2" / "configs" / "sam2.1" / "sam2.1_hiera_t.yaml")
    model = instantiate(cfg.model.memory_attention, _recursive_=True)
    assert isinstance(model, MemoryAttention)
    ours = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    assert ours == ref_out["tiny_shapes"]


def test_dropout_acts_only_in_training():
    model = _build(_OURS, VARIANTS["config_like"])
    x = dict(_model_inputs(), num_obj_ptr_tokens=NUM_PTR_TOKENS)
    with torch.no_grad():
        first, second = model.eval()(**x), model(**x)
        assert torch.equal(first, second)
        assert not torch.allclose(model.train()(**x), first)


def test_mismatched_batch_sizes_are_rejected_with_shapes():
    model = _build(_OURS, VARIANTS["config_like"])
    x = _model_inputs()
    with pytest.raises(ValueError, match=r"curr \(64, 2, 32\) and memory \(196, 1, 16\)"):
        model(x["curr"], x["memory"][:, :1], x["curr_pos"], x["memory_pos"][:, :1])
