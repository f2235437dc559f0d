from __future__ import annotations

import numpy as np
import pytest
import torch

from training.model.prompt_policy import PromptPolicy, plan_prompts
from training.model.prompt_sampling import (
    PADDING,
    get_next_point,
    sample_box_points,
    sample_initial_click,
    sample_random_points_from_errors,
    squared_distance_to_background,
)

SIZE = 32

# The official center sampler calls OpenCV's exact distance transform; OpenCV is not installed,
# so the reference process gets a brute-force exact one under the same name.
CV2_SHIM = """
import sys, types
import numpy as np
def _distance_transform(src, distance_type, mask_size):
    fg, bg = np.argwhere(src > 0), np.argwhere(src == 0)
    out = np.zeros(src.shape, np.float32)
    if len(fg) and len(bg):
        d2 = ((fg[:, None, :] - bg[None, :, :]) ** 2).sum(-1).min(1)
        out[tuple(fg.T)] = np.sqrt(d2).astype(np.float32)
    return out
sys.modules["cv2"] = types.SimpleNamespace(distanceTransform=_distance_transform, DIST_L2=2)
"""

MOSE_TRAIN = dict(
    prob_to_use_pt_input=0.5,
    prob_to_use_box_input=0.5,
    num_frames_to_correct=2,
    rand_frames_to_correct=True,
    num_init_cond_frames=2,
    rand_init_cond_frames=True,
    point_sampling="uniform",
    prob_to_sample_from_gt=0.1,
)
NUM_CLIPS, CLIP_FRAMES = 300, 5


def _blobs(num: int, seed: int) -> torch.Tensor:
    """`[num, 1, SIZE, SIZE]` bool masks: unions of random rectangles and discs."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    masks = torch.zeros(num, 1, SIZE, SIZE, dtype=torch.bool)
    for i in range(num):
        for _ in range(2):
            cy, cx, r = (torch.randint(0, SIZE, (2,), generator=gen).tolist() + [int(torch.randint(3, 10, (1,), generator=gen))])
            if torch.rand(1, generator=gen) < 0.5:
                masks[i, 0] |= (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
            else:
                masks[i, 0] |= ((ys - cy).abs() <= r) & ((xs - cx).abs() <= r // 2 + 1)
    return masks


def _center_cases() -> tuple[torch.Tensor, torch.Tensor]:
    gt, pred = _blobs(8, seed=1), _blobs(8, seed=2)
    pred[0] = gt[0] & ~_blobs(1, seed=3)[0]  # only false negatives
    pred[1] = gt[1] | _blobs(1, seed=4)[0]  # only false positives
    gt[2, 0, :, :] = True  # an object touching every border
    return gt, pred


def _clip_masks() -> torch.Tensor:
    return _blobs(CLIP_FRAMES * 2, seed=5).view(CLIP_FRAMES, 2, 1, SIZE, SIZE)


def _summarise(init_cond, to_correct, use_pt, point_inputs, mask_inputs) -> list:
    kinds = []
    for t in init_cond:
        if t in mask_inputs:
            kinds.append("mask")
        else:
            kinds.append("box" if bool((point_inputs[t]["point_labels"] == 2).any()) else "click")
    return [bool(use_pt), list(init_cond), list(to_correct), kinds]


@pytest.fixture(scope="module")
def ref_out(reference):
    gt, pred = _center_cases()
    return reference.run(
        CV2_SHIM
        + """
import types
from sam2.modeling.sam2_utils import get_next_point
from training.model.sam2 import SAM2Train
gt, pred = inputs["gt"], inputs["pred"]
outputs["center"] = get_next_point(gt, pred, "center")
outputs["center_from_gt"] = get_next_point(gt, None, "center")

policy = inputs["policy"]
fake = types.SimpleNamespace(training=True, rng=np.random.default_rng(seed=42))
for key in ("prob_to_use_pt_input", "prob_to_use_box_input", "num_frames_to_correct",
            "rand_frames_to_correct", "num_init_cond_frames", "rand_init_cond_frames"):
    setattr(fake, key + "_for_train", policy[key])
clip = types.SimpleNamespace(masks=inputs["clip_masks"][:, :, 0], num_frames=inputs["clip_masks"].shape[0])
plans = []
for _ in range(inputs["num_clips"]):
    out = SAM2Train.prepare_prompt_inputs(fake, {}, clip)
    kinds = []
    for t in out["init_cond_frames"]:
        if t in out["mask_inputs_per_frame"]:
            kinds.append("mask")
        else:
            labels = out["point_inputs_per_frame"][t]["point_labels"]
            kinds.append("box" if bool((labels == 2).any()) else "click")
    plans.append([bool(out["use_pt_input"]), list(out["init_cond_frames"]), list(out["frames_to_add_correction_pt"]), kinds])
outputs["plans"] = plans
""",
        gt=gt,
        pred=pred,
        policy=MOSE_TRAIN,
        clip_masks=_clip_masks(),
        num_clips=NUM_CLIPS,
    )


@pytest.mark.reference
def test_center_clicks_match_reference(ref_out):
    gt, pred = _center_cases()
    points, labels = get_next_point(gt, pred, "center")
    assert torch.equal(points, ref_out["center"][0]) and torch.equal(labels, ref_out["center"][1])
    points, labels = get_next_point(gt, None, "center")
    assert torch.equal(points, ref_out["center_from_gt"][0])
    assert torch.equal(labels, ref_out["center_from_gt"][1])


@pytest.mark.reference
def test_prompt_decisions_match_reference_for_the_same_seed(ref_out):
    rng = np.random.default_rng(seed=42)
    masks = _clip_masks()
    gt_per_frame = {t: masks[t] for t in range(CLIP_FRAMES)}
    policy = PromptPolicy(**MOSE_TRAIN)
    ours = []
    for _ in range(NUM_CLIPS):
        plan = plan_prompts(policy, gt_per_frame, CLIP_FRAMES, rng)
        ours.append(
            _summarise(plan.init_cond_frames, plan.frames_to_add_correction_pt, plan.use_pt_input, plan.point_inputs_per_frame, plan.mask_inputs_per_frame)
        )
    assert ours == ref_out["plans"]


def test_prompt_types_follow_the_configured_probabilities():
    rng = np.random.default_rng(seed=0)
    masks = _clip_masks()
    gt_per_frame = {t: masks[t] for t in range(CLIP_FRAMES)}
    policy = PromptPolicy(**{**MOSE_TRAIN, "prob_to_use_pt_input": 0.6, "prob_to_use_box_input": 0.3})
    counts = {"mask": 0, "box": 0, "click": 0}
    num_init = {1: 0, 2: 0}
    draws = 2000
    for _ in range(draws):
        plan = plan_prompts(policy, gt_per_frame, CLIP_FRAMES, rng)
        first = plan.init_cond_frames[0]
        assert first == 0 and len(set(plan.init_cond_frames)) == len(plan.init_cond_frames)
        num_init[len(plan.init_cond_frames)] += 1
        if not plan.use_pt_input:
            counts["mask"] += 1
            assert plan.frames_to_add_correction_pt == []
        else:
            labels = plan.point_inputs_per_frame[first]["point_labels"]
            counts["box" if (labels == 2).any() else "click"] += 1
            corrected = plan.frames_to_add_correction_pt
            assert corrected[: len(plan.init_cond_frames)] == plan.init_cond_frames and len(corrected) <= 2
    # Binomial standard deviations at 2000 draws are about 0.011; the bound is 4 of them.
    assert counts["mask"] / draws == pytest.approx(0.4, abs=0.045)
    assert counts["box"] / draws == pytest.approx(0.6 * 0.3, abs=0.045)
    assert counts["click"] / draws == pytest.approx(0.6 * 0.7, abs=0.045)
    assert num_init[1] / draws == pytest.approx(0.5, abs=0.045)


def test_exact_distance_transform_matches_brute_force():
    masks = _blobs(4, seed=7)[:, 0]
    masks[3] = True
    ours = squared_distance_to_background(masks)
    pad = torch.nn.functional.pad(masks, (1, 1, 1, 1))
    for b in range(masks.shape[0]):
        fg, bg = pad[b].nonzero(), (~pad[b]).nonzero()
        expected = torch.zeros_like(pad[b], dtype=torch.int64)
        expected[fg[:, 0], fg[:, 1]] = ((fg[:, None] - bg[None]) ** 2).sum(-1).amin(1)
        assert torch.equal(ours[b], expected[1:-1, 1:-1])


@pytest.mark.parametrize("method", ["uniform", "center"])
def test_correction_clicks_land_in_errors_with_the_right_labels(method):
    gt, pred = _blobs(64, seed=11), _blobs(64, seed=12)
    for seed in range(5 if method == "uniform" else 1):
        torch.manual_seed(seed)
        points, labels = get_next_point(gt, pred, method)
        x, y = points[:, 0, 0].long(), points[:, 0, 1].long()
        idx = torch.arange(gt.shape[0])
        in_gt, in_pred = gt[idx, 0, y, x], pred[idx, 0, y, x]
        has_error = (gt != pred).flatten(1).any(1)
        assert has_error.all()
        positive = labels[:, 0] == 1
        assert (in_gt & ~in_pred)[positive].all(), "positive clicks must be in false negatives"
        assert (~in_gt & in_pred)[~positive].all(), "negative clicks must be in false positives"
        assert set(labels.unique().tolist()) <= {0, 1}


def test_uniform_clicks_are_uniform_over_the_error_pixels():
    gt = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    gt[0, 0, 2:5, 3:7] = True  # 12 false-negative pixels (no prediction)
    gt[1, 0, 7, 7] = True  # a single one, in the last pixel
    draws = 12 * 2000
    points, labels = sample_random_points_from_errors(gt, None, num_pt=draws, generator=torch.Generator().manual_seed(0))
    assert (labels == 1).all()
    flat = points[..., 1].long() * 8 + points[..., 0].long()
    assert (flat[1] == 63).all()
    counts = torch.bincount(flat[0], minlength=64)
    assert torch.equal(counts > 0, gt[0, 0].flatten())
    expected = draws / 12
    chi_square = float(((counts[counts > 0] - expected) ** 2 / expected).sum())
    assert chi_square < 31.3, chi_square  # the 0.001 tail of chi-square with 11 degrees of freedom


def test_clicks_from_ground_truth_are_positive_and_inside():
    gt = _blobs(32, seed=13)
    points, labels = sample_random_points_from_errors(gt, None, num_pt=4)
    idx = torch.arange(gt.shape[0])[:, None]
    assert (labels == 1).all()
    assert gt[idx, 0, points[..., 1].long(), points[..., 0].long()].all()


def test_no_error_gives_a_correctly_labelled_click():
    gt = _blobs(4, seed=14)
    gt[3] = True
    for method in ("uniform", "center"):
        points, labels = get_next_point(gt, gt.clone(), method)
        inside = gt[torch.arange(4), 0, points[:, 0, 1].long(), points[:, 0, 0].long()]
        assert torch.equal(inside, labels[:, 0] == 1), method


def test_boxes_cover_the_mask_within_the_noise_and_empty_objects_get_padding():
    gt = _blobs(16, seed=15)
    gt[5] = False
    points, labels = sample_box_points(gt, noise=0.1, noise_bound=20)
    assert points.shape == (16, 2, 2)
    assert (labels[5] == PADDING).all() and (points[5] == 0).all()
    present = torch.ones(16, dtype=torch.bool)
    present[5] = False
    assert (labels[present] == torch.tensor([2, 3], dtype=torch.int32)).all()
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for b in present.nonzero()[:, 0].tolist():
        x0, x1 = xs[gt[b, 0]].min(), xs[gt[b, 0]].max()
        y0, y1 = ys[gt[b, 0]].min(), ys[gt[b, 0]].max()
        tol = torch.tensor([(x1 - x0) * 0.1, (y1 - y0) * 0.1]) + 1e-5
        assert ((points[b, 0] - torch.stack([x0, y0])).abs() <= tol).all()
        assert ((points[b, 1] - torch.stack([x1, y1])).abs() <= tol).all()
        assert (points[b] >= 0).all() and (points[b] <= SIZE - 1).all()
    points, labels = sample_initial_click(gt, "center")
    assert labels[5, 0] == PADDING and (labels[present] == 1).all()
