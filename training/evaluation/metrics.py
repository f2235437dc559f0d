"""Region similarity J and boundary accuracy F, computed the way the DAVIS 2017 benchmark does.

All functions take `[H, W]` masks (anything `np.asarray(...).astype(bool)` understands) and
return python floats, so results are identical whichever framework produced the masks.

Conventions follow the DAVIS evaluation, so numbers are comparable with published ones:
- J of two empty masks is 1 (nothing to find, nothing found);
- boundaries are one pixel wide and offset half a pixel towards the origin (`boundary_map`);
- two boundary pixels match when they lie within `ceil(bound_th * image diagonal)` pixels
  (a disk), with `bound_th = 0.008` by default; a `bound_th >= 1` is taken as pixels directly;
- F of an empty boundary against an empty boundary is 1, against a non-empty one 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from training.evaluation.morphology import disk_dilate

DAVIS_BOUND_TH = 0.008


def _as_mask(mask: Any, name: str) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be an [H, W] mask, got shape {mask.shape}")
    return mask.astype(bool)


def _check_pair(gt: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = _as_mask(gt, "gt"), _as_mask(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(
            f"gt and pred must have the same size, got {gt.shape} and {pred.shape}; "
            "resize the prediction to the ground truth's resolution first"
        )
    return gt, pred


def region_iou(gt: Any, pred: Any, void: Any | None = None) -> float:
    """J: |gt & pred| / |gt | pred| over non-void pixels; 1.0 when both are empty."""
    gt, pred = _check_pair(gt, pred)
    keep = ~_as_mask(void, "void") if void is not None else np.ones_like(gt)
    union = np.count_nonzero((gt | pred) & keep)
    if union == 0:
        return 1.0
    return np.count_nonzero(gt & pred & keep) / union


def boundary_map(mask: Any) -> np.ndarray:
    """`[H, W]` bool: pixels whose east, south or south-east neighbour differs from them.

    This is the DAVIS `seg2bmap` boundary: one pixel wide, half a pixel towards the origin
    from the true contour. Neighbours beyond the image are ignored (never a difference).
    """
    seg = _as_mask(mask, "mask")
    out = np.zeros_like(seg)
    out[:, :-1] |= seg[:, :-1] != seg[:, 1:]
    out[:-1, :] |= seg[:-1, :] != seg[1:, :]
    out[:-1, :-1] |= seg[:-1, :-1] != seg[1:, 1:]
    return out


def boundary_tolerance(shape: tuple[int, int], bound_th: float = DAVIS_BOUND_TH) -> float:
    """Match radius in pixels: `bound_th` itself if >= 1, else `ceil(bound_th * diagonal)`."""
    if bound_th >= 1:
        return float(bound_th)
    return float(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def boundary_precision_recall(
    gt: Any, pred: Any, void: Any | None = None, *, bound_th: float = DAVIS_BOUND_TH
) -> tuple[float, float]:
    """(precision, recall) of pred's boundary against gt's, within the DAVIS tolerance."""
    gt, pred = _check_pair(gt, pred)
    if void is not None:
        keep = ~_as_mask(void, "void")
        gt, pred = gt & keep, pred & keep
    radius = boundary_tolerance(gt.shape, bound_th)
    gt_boundary, pred_boundary = boundary_map(gt), boundary_map(pred)
    num_gt, num_pred = np.count_nonzero(gt_boundary), np.count_nonzero(pred_boundary)
    if num_gt == 0 or num_pred == 0:
        # Nothing predicted is perfectly precise; nothing to find is perfectly recalled.
        return (1.0 if num_pred == 0 else 0.0), (1.0 if num_gt == 0 else 0.0)
    precision = np.count_nonzero(pred_boundary & disk_dilate(gt_boundary, radius)) / num_pred
    recall = np.count_nonzero(gt_boundary & disk_dilate(pred_boundary, radius)) / num_gt
    return precision, recall


def boundary_f_measure(gt: Any, pred: Any, void: Any | None = None, *, bound_th: float = DAVIS_BOUND_TH) -> float:
    """F: harmonic mean of boundary precision and recall (0 when both are 0)."""
    precision, recall = boundary_precision_recall(gt, pred, void, bound_th=bound_th)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def mask_iou(gt: Any, pred: Any) -> float:
    """Plain IoU for interactive image segmentation (same convention as `region_iou`)."""
    return region_iou(gt, pred)


def frame_statistics(per_frame: np.ndarray | list[float]) -> dict[str, float]:
    """DAVIS per-object summary of a per-frame score: mean, recall (> 0.5) and decay.

    Decay is the mean of the first quarter of the frames minus that of the last quarter,
    with the DAVIS binning (4 bins over the evaluated frames).
    """
    values = np.asarray(per_frame, dtype=np.float64)
    if values.size == 0:
        return {"mean": math.nan, "recall": math.nan, "decay": math.nan}
    edges = np.round(np.linspace(1, values.size, 5) + 1e-10).astype(int) - 1
    bins = [values[edges[i] : edges[i + 1] + 1] for i in range(4)]
    return {
        "mean": float(np.nanmean(values)),
        "recall": float(np.nanmean(values > 0.5)),
        "decay": float(np.nanmean(bins[0]) - np.nanmean(bins[3])),
    }
