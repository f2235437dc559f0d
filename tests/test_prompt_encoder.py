from __future__ import annotations

import pytest
import torch

from sam2.modeling.sam.prompt_encoder import PromptEncoder
from tests.reference import assert_close

EMBED, GRID, IMAGE, MASK_CHANS = 32, (16, 16), (64, 64), 16

# Each case: which prompts are given (points, boxes, masks).
CASES = {
    "points": (True, False, False),
    "points_boxes": (True, True, False),
    "boxes": (False, True, False),
    "masks": (False, False, True),
    "points_masks": (True, False, True),
    "all": (True, True, True),
    "none": (False, False, False),
}


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "coords": torch.rand(3, 5, 2, generator=g) * 64,
        # every label, including padding (-1) and box corners given as points
        "labels": torch.tensor([[1, 0, -1, 2, 3], [1, 1, 0, -1, -1], [0, 3, 2, 1, 0]]),
        "boxes": torch.rand(3, 4, generator=g) * 64,
        "masks": torch.randn(3, 1, 64, 64, generator=g) * 4,
    }


def _prompts(case: str, i: dict) -> tuple:
    use_points, use_boxes, use_masks = CASES[case]
    return (
        (i["coords"], i["labels"]) if use_points else None,
        i["boxes"] if use_boxes else None,
        i["masks"] if use_masks else None,
    )


@pytest.fixture(scope="module")
def ref_out(reference):
    return reference.run(
        f"""
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        i = inputs
        torch.manual_seed(0)
        enc = PromptEncoder({EMBED}, {GRID!r}, {IMAGE!r}, {MASK_CHANS})
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(0.1 * torch.randn_like(p))
        outputs["sd"] = enc.state_dict()
        outputs["dense_pe"] = enc.get_dense_pe()
        results = {{}}
        for case, (use_points, use_boxes, use_masks) in {CASES!r}.items():
            results[case] = enc(
                (i["coords"], i["labels"]) if use_points else None,
                i["boxes"] if use_boxes else None,
                i["masks"] if use_masks else None,
            )
        outputs["results"] = results
        masks = i["masks"].clone().requires_grad_()
        sparse, dense = enc((i["coords"], i["labels"]), i["boxes"], masks)
        (sparse.square().sum() + dense.sin().sum()).backward()
        outputs["grads"] = dict(masks=masks.grad, **{{n: p.grad for n, p in enc.named_parameters()}})
        """,
        **_inputs(),
    )


pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def ours(ref_out) -> PromptEncoder:
    enc = PromptEncoder(EMBED, GRID, IMAGE, MASK_CHANS)
    enc.load_state_dict(ref_out["sd"], strict=True)
    return enc


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_embeddings_match_reference(ours, ref_out, case):
    sparse, dense = ours(*_prompts(case, _inputs()))
    assert_close((sparse, dense), ref_out["results"][case])


def test_token_counts_follow_the_padding_rule(ours):
    i = _inputs()
    # A padding point is appended to clicks only when no box follows them.
    assert ours((i["coords"], i["labels"]), None, None)[0].shape == (3, 6, EMBED)
    assert ours((i["coords"], i["labels"]), i["boxes"], None)[0].shape == (3, 7, EMBED)
    assert ours(None, i["boxes"], None)[0].shape == (3, 2, EMBED)
    sparse, dense = ours(None, None, None)
    assert sparse.shape == (1, 0, EMBED) and dense.shape == (1, EMBED, *GRID)


def test_dense_pe_matches_reference(ours, ref_out):
    assert ours.get_dense_pe().shape == (1, EMBED, *GRID)
    assert_close(ours.get_dense_pe(), ref_out["dense_pe"])


def test_gradients_match_reference(ours, ref_out):
    i = _inputs()
    ours.zero_grad()
    masks = i["masks"].clone().requires_grad_()
    sparse, dense = ours((i["coords"], i["labels"]), i["boxes"], masks)
    (sparse.square().sum() + dense.sin().sum()).backward()
    grads = dict(masks=masks.grad, **{n: p.grad for n, p in ours.named_parameters()})
    assert set(grads) == set(ref_out["grads"])
    for name, ref_grad in ref_out["grads"].items():
        if ref_grad is None:  # no_mask_embed: unused when a mask is given
            assert grads[name] is None, name
            continue
        # Conv weight gradients sum ~3000 terms of magnitude up to ~400: their rounding depends on the
        # thread count (1e-4 between 1 and 2 threads of the same code), so the tolerance scales with it.
        scale = max(1.0, ref_grad.abs().max().item())
        assert_close(grads[name], ref_grad, atol=1e-5 * scale, path=name)


def test_mask_input_size_is_four_times_the_grid(ours):
    assert ours.mask_input_size == (64, 64)
