from __future__ import annotations

import pytest
import torch

from sam2.modeling.position_encoding import (
    AxialRotaryTables,
    PositionEmbeddingRandom,
    PositionEmbeddingSine,
    get_1d_sine_pe,
    pairs_to_halves,
    rotate_halves,
)
from tests.reference import assert_close

GRID_SHAPES = [(2, 8, 16, 16), (1, 4, 8, 12), (3, 1, 5, 7), (1, 1, 1, 1)]


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "px": torch.rand(2, 5, generator=g),
        "py": torch.rand(2, 5, generator=g),
        "plabels": torch.randint(-1, 4, (2, 5), generator=g).float(),
        "bx": torch.rand(6, generator=g),
        "by": torch.rand(6, generator=g),
        "bw": torch.rand(6, generator=g),
        "bh": torch.rand(6, generator=g),
        "coords": torch.rand(3, 7, 2, generator=g) * torch.tensor([96.0, 64.0]),
        "pos": torch.tensor([0.0, 1.0, 2.0, 3.5, 7.0, -1.0]),
        "xq": torch.randn(2, 3, 12, 16, generator=g),
        "xk": torch.randn(2, 3, 36, 16, generator=g),
    }


@pytest.fixture(scope="module")
def ref_out(reference):
    return reference.run(
        f"""
        from sam2.modeling.position_encoding import (
            PositionEmbeddingSine, PositionEmbeddingRandom, compute_axial_cis, apply_rotary_enc)
        from sam2.modeling.sam2_utils import get_1d_sine_pe
        i = inputs
        sine = PositionEmbeddingSine(32)
        raw = PositionEmbeddingSine(16, temperature=20, normalize=False)
        scaled = PositionEmbeddingSine(24, normalize=True, scale=3.0)
        outputs["grids"] = [sine(torch.zeros(s)) for s in {GRID_SHAPES!r}]
        outputs["grids_cached"] = [sine(torch.zeros(s)) for s in {GRID_SHAPES!r}]
        outputs["raw_grid"] = raw(torch.zeros(2, 3, 6, 9))
        outputs["scaled_grid"] = scaled(torch.zeros(1, 3, 9, 6))
        outputs["points"] = sine.encode_points(i["px"], i["py"], i["plabels"])
        outputs["boxes"] = sine.encode_boxes(i["bx"], i["by"], i["bw"], i["bh"])
        torch.manual_seed(3)
        rnd = PositionEmbeddingRandom(16, scale=2.0)
        outputs["random_sd"] = rnd.state_dict()
        outputs["random_grid"] = rnd((8, 12))
        outputs["random_coords"] = rnd.forward_with_coords(i["coords"], (64, 96))
        outputs["sine_1d"] = [get_1d_sine_pe(i["pos"], dim=d) for d in (64, 10)]
        outputs["sine_1d_temp"] = get_1d_sine_pe(i["pos"][None], dim=8, temperature=100)
        cis = compute_axial_cis(dim=16, end_x=4, end_y=3)
        outputs["rope_q"], outputs["rope_k"] = apply_rotary_enc(i["xq"], i["xk"], cis, repeat_freqs_k=True)
        """,
        **_inputs(),
    )


pytestmark = pytest.mark.reference


def test_sine_grid_matches_reference_at_several_sizes(ref_out):
    sine = PositionEmbeddingSine(32)
    ours = [sine(torch.zeros(s)) for s in GRID_SHAPES]
    assert_close(ours, ref_out["grids"])
    assert_close([sine(torch.zeros(s)) for s in GRID_SHAPES], ref_out["grids_cached"])
    assert set(sine.cache) == {s[-2:] for s in GRID_SHAPES}
    assert [o.shape for o in ours] == [torch.Size((s[0], 32, s[2], s[3])) for s in GRID_SHAPES]


def test_sine_grid_options_match_reference(ref_out):
    assert_close(
        PositionEmbeddingSine(16, temperature=20, normalize=False)(torch.zeros(2, 3, 6, 9)), ref_out["raw_grid"]
    )
    assert_close(PositionEmbeddingSine(24, normalize=True, scale=3.0)(torch.zeros(1, 3, 9, 6)), ref_out["scaled_grid"])


def test_sine_output_is_a_fresh_tensor_per_call():
    sine = PositionEmbeddingSine(8)
    first = sine(torch.zeros(1, 1, 4, 4))
    first.add_(1.0)
    assert not torch.equal(sine(torch.zeros(1, 1, 4, 4)), first)


def test_sine_has_no_state_and_rejects_bad_options():
    assert PositionEmbeddingSine(32).state_dict() == {}
    with pytest.raises(ValueError, match="even"):
        PositionEmbeddingSine(7)
    with pytest.raises(ValueError, match="normalize=True"):
        PositionEmbeddingSine(8, normalize=False, scale=2.0)


def test_encode_points_and_boxes_match_reference(ref_out):
    i = _inputs()
    sine = PositionEmbeddingSine(32)
    assert_close(sine.encode_points(i["px"], i["py"], i["plabels"]), ref_out["points"])
    assert_close(sine.encode_boxes(i["bx"], i["by"], i["bw"], i["bh"]), ref_out["boxes"])
    assert_close(sine.encode(i["bx"], i["by"], i["bw"], i["bh"]), ref_out["boxes"])


def test_random_embedding_matches_reference(ref_out):
    i = _inputs()
    rnd = PositionEmbeddingRandom(16, scale=2.0)
    rnd.load_state_dict(ref_out["random_sd"], strict=True)
    assert_close(rnd((8, 12)), ref_out["random_grid"])
    assert_close(rnd.forward_with_coords(i["coords"], (64, 96)), ref_out["random_coords"])


def test_random_embedding_buffer_draws_like_the_reference(ref_out):
    torch.manual_seed(3)
    rnd = PositionEmbeddingRandom(16, scale=2.0)
    assert_close(rnd.state_dict(), ref_out["random_sd"], rtol=0, atol=0)


def test_1d_sine_matches_reference(ref_out):
    pos = _inputs()["pos"]
    assert_close([get_1d_sine_pe(pos, dim=d) for d in (64, 10)], ref_out["sine_1d"])
    assert_close(get_1d_sine_pe(pos[None], dim=8, temperature=100), ref_out["sine_1d_temp"])


def _in_halves_order(x: torch.Tensor) -> torch.Tensor:
    """Official-layout channels (pairs side by side) -> halves order, as the projections give them."""
    return pairs_to_halves(x, x.shape[-1])


def test_axial_rotation_matches_reference_complex_rotation(ref_out):
    """In halves order, our rotation is the official complex one (its pairs side by side)."""
    i = _inputs()
    cos, sin = AxialRotaryTables(16).get(4, 3, torch.device("cpu"))
    assert_close(rotate_halves(_in_halves_order(i["xq"]), cos, sin), _in_halves_order(ref_out["rope_q"]))
    # Keys of three frames of the 12-token grid: the same tables turn every frame.
    assert_close(rotate_halves(_in_halves_order(i["xk"]), cos, sin, num_rotated=36), _in_halves_order(ref_out["rope_k"]))


def test_halves_order_takes_each_heads_pairs_apart():
    channels = torch.arange(8.0)
    assert pairs_to_halves(channels, head_dim=4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    rows = pairs_to_halves(torch.arange(8.0)[:, None].expand(8, 3), head_dim=4, dim=0)
    assert rows[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_axial_rotation_preserves_pair_norms_and_dtype():
    x = torch.randn(2, 1, 9, 8, dtype=torch.bfloat16)
    cos, sin = AxialRotaryTables(8).get(3, 3, torch.device("cpu"))
    y = rotate_halves(x, cos, sin)
    assert y.dtype == torch.bfloat16

    def pair_norms(t: torch.Tensor) -> torch.Tensor:
        return torch.stack(t.float().chunk(2, dim=-1), dim=-1).norm(dim=-1)

    torch.testing.assert_close(pair_norms(y), pair_norms(x), rtol=2e-2, atol=2e-2)
    # Token 0 sits at the origin of the grid: no rotation at all.
    assert torch.equal(y[..., 0, :], x[..., 0, :])


def test_axial_tables_reject_head_dims_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        AxialRotaryTables(6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_rotation_values_and_gradients_are_the_written_out_rotations(dtype):
    """Three memory frames' keys and two unturned pointer tokens: `[B, heads, 3 * N + 2, D]`."""
    cos, sin = AxialRotaryTables(8).get(3, 2, torch.device("cpu"))
    x = torch.randn(2, 1, 3 * 6 + 2, 8, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def written_out(t):
        frames, pointers = t.double()[:, :, :18].unflatten(-2, (3, 6)), t.double()[:, :, 18:]
        a, b = frames.chunk(2, dim=-1)
        c, s = cos.double(), sin.double()
        return torch.cat((torch.cat((a * c - b * s, b * c + a * s), dim=-1).flatten(2, 3), pointers), dim=2)

    out = rotate_halves(x, cos, sin, num_rotated=18)
    (grad,) = torch.autograd.grad((out.double() * weights).sum(), x)
    expected = written_out(x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    assert out.dtype == dtype and grad.dtype == dtype
    # Float32 arithmetic inside, rounded once to the input's dtype.
    tol = {"rtol": 0, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), **tol)
    torch.testing.assert_close(grad.double(), expected_grad.to(dtype).double(), **tol)
    assert torch.equal(out[:, :, 18:], x[:, :, 18:])
