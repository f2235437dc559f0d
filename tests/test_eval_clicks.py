"""Click simulation and NoC on synthetic shapes: where clicks land, their sign, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation.clicks import (
    Click,
    clicks_to_reach,
    correction_click,
    first_click,
    interior_point,
    largest_error_region,
    mask_box,
)


def disk(shape: tuple[int, int], cy: int, cx: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def test_first_click_is_centre_of_a_disk():
    assert first_click(disk((40, 60), 17, 41, 9)) == Click(41, 17, positive=True)


def test_first_click_avoids_image_border():
    mask = np.zeros((30, 30), bool)
    mask[:, :12] = True  # touches three image edges: the centre must still be away from them
    # 6 px from the left edge, the right side and the top edge; ties go to raster order.
    assert interior_point(mask) == (5, 5)
    assert interior_point(np.zeros((5, 5), bool)) is None
    assert first_click(np.zeros((5, 5), bool)) is None


def test_first_click_in_an_annulus_stays_on_the_ring():
    mask = disk((41, 41), 20, 20, 18) & ~disk((41, 41), 20, 20, 8)
    x, y = interior_point(mask)
    assert mask[y, x]
    assert 10 <= np.hypot(x - 20, y - 20) <= 16


def test_correction_click_positive_in_largest_missed_region():
    gt = np.zeros((40, 40), bool)
    gt[5:35, 5:35] = True
    pred = gt.copy()
    pred[10:20, 10:20] = False  # missed 10 x 10 -> positive click in its centre
    pred[30:33, 36:39] = True  # small spill, 9 px
    click = correction_click(gt, pred)
    assert click.positive and click.label == 1
    assert 14 <= click.x <= 15 and 14 <= click.y <= 15


def test_correction_click_negative_in_largest_false_positive():
    gt = disk((50, 50), 25, 25, 6)
    pred = gt | disk((50, 50), 10, 40, 7)  # a big spill
    region, missed = largest_error_region(gt, pred)
    assert not missed and region.sum() == (disk((50, 50), 10, 40, 7) & ~gt).sum()
    assert correction_click(gt, pred) == Click(40, 10, positive=False)


def test_correction_click_none_when_perfect_and_ties_prefer_missed():
    gt = disk((20, 20), 10, 10, 5)
    assert correction_click(gt, gt) is None
    gt = np.zeros((10, 20), bool)
    gt[2:5, 2:5] = True
    pred = np.zeros_like(gt)
    pred[2:5, 12:15] = True  # 9 missed, 9 spilled
    assert correction_click(gt, pred) == Click(3, 3, positive=True)


def test_clicks_are_deterministic():
    rng = np.random.default_rng(3)
    gt = rng.random((48, 48)) < 0.5
    pred = rng.random((48, 48)) < 0.5
    clicks = {correction_click(gt, pred) for _ in range(3)}
    assert len(clicks) == 1


def test_noc_counts_first_click_reaching_threshold_and_caps():
    assert clicks_to_reach([0.5, 0.86, 0.91], 0.85) == 2
    assert clicks_to_reach([0.5, 0.86, 0.91], 0.90) == 3
    assert clicks_to_reach([0.95], 0.90) == 1
    assert clicks_to_reach([0.5] * 30, 0.85) == 20
    assert clicks_to_reach([0.5] * 20 + [0.99], 0.85) == 20  # a click past the cap does not count
    assert clicks_to_reach([0.1, 0.2], 0.9, max_clicks=5) == 5


def test_simulated_clicks_converge_on_a_shape():
    # An oracle that paints a disk of radius 4 around each click (positive adds, negative
    # removes): the simulated clicks must steer it to the ground truth.
    gt = disk((40, 40), 20, 20, 9) | disk((40, 40), 8, 30, 5)
    pred = np.zeros_like(gt)
    ious = []
    for _ in range(20):
        click = correction_click(gt, pred) if pred.any() else first_click(gt)
        if click is None:
            ious.append(1.0)
            continue
        brush = disk(gt.shape, click.y, click.x, 4)
        pred = (pred | (brush & gt)) if click.positive else (pred & ~(brush & ~gt))
        ious.append((gt & pred).sum() / (gt | pred).sum())
    assert ious[-1] == 1.0
    assert clicks_to_reach(ious, 0.85) <= clicks_to_reach(ious, 0.90) < 20
    assert all(b >= a for a, b in zip(ious, ious[1:]))


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4)), np.zeros(5)])
def test_clicks_reject_non_2d_masks(bad):
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        interior_point(bad)


def test_mask_box_is_inclusive_and_rejects_empty():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask) == [3.0, 2.0, 8.0, 4.0]
    with pytest.raises(ValueError, match="empty mask"):
        mask_box(np.zeros((4, 4), bool))
