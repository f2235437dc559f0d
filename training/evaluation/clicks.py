"""Deterministic click simulation for interactive segmentation benchmarks.

The first click goes to the object's interior point farthest from its boundary; each
correction click goes to the interior-most point of the largest error region (a false-negative
region gives a positive click, a false-positive region a negative one). Ties are broken in
raster order, so the same masks always give the same clicks, on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.evaluation.morphology import distance_inside, label_components

NOC_MAX_CLICKS = 20


@dataclass(frozen=True)
class Click:
    """A point prompt in pixel coordinates of the ground-truth mask (x = column, y = row)."""

    x: int
    y: int
    positive: bool

    @property
    def label(self) -> int:
        """SAM's point label: 1 foreground, 0 background."""
        return int(self.positive)


def _bool_mask(mask: Any, name: str) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be an [H, W] mask, got shape {mask.shape}")
    return mask


def interior_point(mask: Any) -> tuple[int, int] | None:
    """(x, y) of the pixel of `[H, W]` `mask` farthest from its boundary; None if empty.

    The image border counts as boundary, so the point of an object cut by the frame edge
    stays away from that edge too.
    """
    mask = _bool_mask(mask, "mask")
    if not mask.any():
        return None
    dist = distance_inside(mask)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def mask_box(mask: Any) -> list[float]:
    """Box prompt `[x0, y0, x1, y1]` of a non-empty `[H, W]` mask (inclusive pixel coordinates)."""
    mask = _bool_mask(mask, "mask")
    if not mask.any():
        raise ValueError("an empty mask has no box; leave objects absent from the frame out of box prompts")
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def first_click(gt: Any) -> Click | None:
    """The standard single click: positive, at the object's most interior point."""
    point = interior_point(gt)
    return None if point is None else Click(point[0], point[1], positive=True)


def largest_error_region(gt: Any, pred: Any, *, connectivity: int = 8) -> tuple[np.ndarray, bool] | None:
    """(`[H, W]` region, is_false_negative) of the largest connected error; None if pred == gt.

    False negatives (missed object) and false positives (spill) are separate regions even when
    they touch, because they call for clicks of opposite sign. On equal areas the missed region
    wins, then the one that starts first in raster order.
    """
    gt, pred = _bool_mask(gt, "gt"), _bool_mask(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred must have the same size, got {gt.shape} and {pred.shape}")
    best: tuple[int, np.ndarray, bool] | None = None
    for errors, missed in ((gt & ~pred, True), (pred & ~gt, False)):
        labels, count = label_components(errors, connectivity=connectivity)
        if count == 0:
            continue
        areas = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
        biggest = int(np.argmax(areas))
        if best is None or areas[biggest] > best[0]:
            best = (int(areas[biggest]), labels == biggest + 1, missed)
    return None if best is None else (best[1], best[2])


def correction_click(gt: Any, pred: Any) -> Click | None:
    """The next simulated click for `pred` against `gt`; None when they are identical."""
    found = largest_error_region(gt, pred)
    if found is None:
        return None
    region, missed = found
    x, y = interior_point(region)  # type: ignore[misc]  # the region is never empty
    return Click(x, y, positive=missed)


def clicks_to_reach(ious: list[float] | np.ndarray, threshold: float, *, max_clicks: int = NOC_MAX_CLICKS) -> int:
    """NoC@threshold: 1-based index of the first click whose IoU reaches `threshold`.

    `ious[i]` is the IoU after click i + 1. When the threshold is never reached within
    `max_clicks` clicks the result is `max_clicks`, as interactive benchmarks report it.
    """
    for index, iou in enumerate(list(ious)[:max_clicks]):
        if iou >= threshold:
            return index + 1
    return max_clicks
