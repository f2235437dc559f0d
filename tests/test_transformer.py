from __future__ import annotations

import pytest
import torch

from sam2.modeling.sam.transformer import Attention, RoPEAttention, TwoWayTransformer
from tests.reference import assert_close

DIM, HEADS = 32, 2
NUM_POINTERS = 4  # object-pointer tokens appended to memory keys, never rotated

# name -> (constructor kwargs, query tokens, key tokens, num_k_exclude_rope)
MEMORY_CROSS = {"rope_k_repeat": True, "feat_sizes": (8, 8), "kv_in_dim": 16}
ROPE_CASES = {
    # keys: three memory frames of the 8x8 query grid, then the object pointers
    "memory_cross": (MEMORY_CROSS, 64, 3 * 64 + NUM_POINTERS, NUM_POINTERS),
    "memory_cross_no_pointers": (MEMORY_CROSS, 64, 2 * 64, 0),
    "self_square_other_size": ({}, 256, 256, 0),
    "self_non_square_feat_sizes": ({"feat_sizes": (8, 4), "rope_theta": 100.0}, 32, 32, 0),
    "one_head": ({"rope_k_repeat": True, "feat_sizes": (4, 4), "num_heads": 1, "dropout": 0.1}, 16, 2 * 16 + 2, 2),
}


def _rope_inputs(name: str) -> dict[str, torch.Tensor]:
    kwargs, nq, nk, _ = ROPE_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    kv_dim = kwargs.get("kv_in_dim", DIM)
    return {
        "q": torch.randn(2, nq, DIM, generator=g),
        "k": torch.randn(2, nk, kv_dim, generator=g),
        "v": torch.randn(2, nk, kv_dim, generator=g),
    }


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "attn_q": torch.randn(2, 5, DIM, generator=g),
        "attn_kv": torch.randn(2, 9, 24, generator=g),
        "image": torch.randn(2, DIM, 16, 16, generator=g),
        "image_pe": torch.randn(2, DIM, 16, 16, generator=g),
        "tokens": torch.randn(2, 7, DIM, generator=g),
        "rope": {name: _rope_inputs(name) for name in ROPE_CASES},
    }


@pytest.fixture(scope="module")
def ref_out(reference):
    return reference.run(
        f"""
        from torch import nn
        from sam2.modeling.sam.transformer import Attention, RoPEAttention, TwoWayTransformer
        i = inputs
        DIM, HEADS = {DIM}, {HEADS}

        def perturbed(module, seed):
            torch.manual_seed(seed)
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            return module.eval()

        attn = perturbed(Attention(DIM, HEADS, downsample_rate=2, kv_in_dim=24), 1)
        outputs["attn_sd"] = attn.state_dict()
        outputs["attn_y"] = attn(i["attn_q"], i["attn_kv"], i["attn_kv"])

        twt = perturbed(TwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=HEADS, mlp_dim=64), 2)
        image, tokens = i["image"].clone().requires_grad_(), i["tokens"].clone().requires_grad_()
        queries, keys = twt(image, i["image_pe"], tokens)
        (queries.square().sum() + keys.sin().sum()).backward()
        outputs["twt_sd"] = twt.state_dict()
        outputs["twt_y"] = (queries, keys)
        outputs["twt_grads"] = (image.grad, tokens.grad)

        rope = {{}}
        for seed, (name, (kwargs, nq, nk, n_exclude)) in enumerate({ROPE_CASES!r}.items()):
            kwargs = dict(kwargs)
            heads = kwargs.pop("num_heads", HEADS)
            module = perturbed(RoPEAttention(embedding_dim=DIM, num_heads=heads, **kwargs), 10 + seed)
            x = {{key: t.clone().requires_grad_() for key, t in i["rope"][name].items()}}
            y = module(x["q"], x["k"], x["v"], num_k_exclude_rope=n_exclude)
            y.square().sum().backward()
            rope[name] = dict(sd=module.state_dict(), y=y, grads={{key: t.grad for key, t in x.items()}})
        outputs["rope"] = rope
        """,
        **_inputs(),
    )


pytestmark = pytest.mark.reference


def test_attention_matches_reference(ref_out):
    i = _inputs()
    attn = Attention(DIM, HEADS, downsample_rate=2, kv_in_dim=24).eval()
    attn.load_state_dict(ref_out["attn_sd"], strict=True)
    assert_close(attn(i["attn_q"], i["attn_kv"], i["attn_kv"]), ref_out["attn_y"])


def test_two_way_transformer_forward_and_input_grads_match_reference(ref_out):
    i = _inputs()
    twt = TwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=HEADS, mlp_dim=64).eval()
    twt.load_state_dict(ref_out["twt_sd"], strict=True)
    image, tokens = i["image"].clone().requires_grad_(), i["tokens"].clone().requires_grad_()
    queries, keys = twt(image, i["image_pe"], tokens)
    (queries.square().sum() + keys.sin().sum()).backward()
    assert queries.shape == (2, 7, DIM) and keys.shape == (2, 256, DIM)
    assert_close((queries, keys), ref_out["twt_y"])
    assert_close((image.grad, tokens.grad), ref_out["twt_grads"])


def test_two_way_transformer_gradients_reach_every_parameter():
    i = _inputs()
    twt = TwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=HEADS, mlp_dim=64)
    queries, keys = twt(i["image"], i["image_pe"], i["tokens"])
    (queries.sum() + keys.sum()).backward()
    missing = [name for name, p in twt.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def _our_rope(name: str, sd: dict) -> tuple[RoPEAttention, int]:
    kwargs, _, _, n_exclude = ROPE_CASES[name]
    kwargs = dict(kwargs)
    heads = kwargs.pop("num_heads", HEADS)
    module = RoPEAttention(embedding_dim=DIM, num_heads=heads, **kwargs).eval()
    module.load_state_dict(sd, strict=True)
    return module, n_exclude


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_attention_forward_and_grads_match_reference(ref_out, name):
    ref = ref_out["rope"][name]
    module, n_exclude = _our_rope(name, ref["sd"])
    x = {key: t.clone().requires_grad_() for key, t in _rope_inputs(name).items()}
    y = module(x["q"], x["k"], x["v"], num_k_exclude_rope=n_exclude)
    y.square().sum().backward()
    assert_close(y, ref["y"])
    assert_close({key: t.grad for key, t in x.items()}, ref["grads"])


def test_rope_attention_runs_in_bfloat16_close_to_float32(ref_out):
    name = "memory_cross"
    module, n_exclude = _our_rope(name, ref_out["rope"][name]["sd"])
    x = _rope_inputs(name)
    expected = module(x["q"], x["k"], x["v"], num_k_exclude_rope=n_exclude)
    low = module.to(torch.bfloat16)
    y = low(*(x[key].bfloat16() for key in "qkv"), num_k_exclude_rope=n_exclude)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_autocast = module.float()(x["q"], x["k"], x["v"], num_k_exclude_rope=n_exclude)
    torch.testing.assert_close(y_autocast.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_rope_attention_dropout_only_in_training():
    module = RoPEAttention(embedding_dim=DIM, num_heads=HEADS, feat_sizes=(4, 4), dropout=0.5)
    q = torch.randn(1, 16, DIM)
    module.eval()
    assert torch.equal(module(q, q, q), module(q, q, q))
    module.train()
    torch.manual_seed(0)
    first = module(q, q, q)
    assert not torch.equal(first, module(q, q, q))


def test_rope_attention_rejects_keys_it_cannot_place():
    q = torch.randn(1, 16, DIM)
    no_repeat = RoPEAttention(embedding_dim=DIM, num_heads=HEADS, feat_sizes=(4, 4))
    with pytest.raises(ValueError, match="rope_k_repeat"):
        no_repeat(q, torch.randn(1, 32, DIM), torch.randn(1, 32, DIM))
    repeat = RoPEAttention(embedding_dim=DIM, num_heads=HEADS, feat_sizes=(4, 4), rope_k_repeat=True)
    with pytest.raises(ValueError, match="whole number"):
        repeat(q, torch.randn(1, 40, DIM), torch.randn(1, 40, DIM), num_k_exclude_rope=3)
    with pytest.raises(ValueError, match="square"):
        repeat(torch.randn(1, 15, DIM), torch.randn(1, 15, DIM), torch.randn(1, 15, DIM))


def test_rope_attention_has_only_projection_weights_in_state_dict():
    module = RoPEAttention(embedding_dim=DIM, num_heads=HEADS, kv_in_dim=16)
    assert sorted(module.state_dict()) == sorted(
        f"{proj}.{kind}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for kind in ("weight", "bias")
    )
    assert module.k_proj.in_features == 16


def test_rope_tables_are_one_per_grid_whatever_the_number_of_memory_frames():
    """Keys over 1, 2 or 3 memory frames broadcast one grid's tables; layers share them."""
    from sam2.modeling.position_encoding import AxialRotaryTables

    layers = [RoPEAttention(embedding_dim=DIM, num_heads=HEADS, feat_sizes=(3, 3), rope_k_repeat=True) for _ in range(2)]
    q = torch.randn(1, 9, DIM)
    for layer in layers:
        for frames in (1, 2, 3):
            keys = torch.randn(1, 9 * frames + 2, DIM)
            layer(q, keys, keys, num_k_exclude_rope=2)
    head_dim = DIM // HEADS
    grids = [key for key in AxialRotaryTables._tables if key[0] == head_dim and key[2:4] == (3, 3)]
    assert len(grids) == 1, grids


def test_rope_tables_first_built_under_inference_mode_serve_training():
    """A video predictor may build the tables under inference mode before training uses them."""
    module = RoPEAttention(embedding_dim=DIM, num_heads=HEADS, feat_sizes=(5, 5), rope_k_repeat=True)
    x = torch.randn(1, 25, DIM)
    with torch.inference_mode():
        module(x, torch.cat([x, x], dim=1), torch.cat([x, x], dim=1))
    keys = torch.randn(1, 50, DIM, requires_grad=True)
    module(x, keys, keys).sum().backward()
    assert keys.grad is not None and keys.grad.abs().sum() > 0


def test_rope_attention_with_an_adapted_projection_permutes_its_outputs_instead():
    """A hooked (or adapter-wrapped) projection runs as it is: same outputs and gradients as the
    weight-gather path, with the hook seeing the official channel order."""
    torch.manual_seed(0)
    module = RoPEAttention(embedding_dim=DIM, num_heads=HEADS, feat_sizes=(3, 3), rope_k_repeat=True)
    q = torch.randn(2, 9, DIM)
    keys = torch.randn(2, 9 * 2 + 3, DIM)

    def run():
        module.zero_grad(set_to_none=True)
        out = module(q, keys, keys, num_k_exclude_rope=3)
        out.square().sum().backward()
        return out.detach(), {name: p.grad for name, p in module.named_parameters()}

    plain_out, plain_grads = run()
    seen = []
    hooks = [proj.register_forward_hook(lambda m, i, o: seen.append(o.detach())) for proj in (module.q_proj, module.k_proj)]
    hooked_out, hooked_grads = run()
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(hooked_out, plain_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hooked_grads, plain_grads, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen[0], torch.nn.functional.linear(q, module.q_proj.weight, module.q_proj.bias))
