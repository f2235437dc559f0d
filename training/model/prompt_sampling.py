"""Simulated user prompts: boxes and clicks from ground-truth masks, correction clicks from errors.

All functions work on a batch of objects: masks are `[B, 1, H, W]` bool, clicks come back as
`points [B, P, 2]` float `(x, y)` pixel coordinates and `labels [B, P]` int32 with 1 = positive,
0 = negative, 2 / 3 = box top-left / bottom-right, and -1 = padding ("no click", the prompt
encoder's not-a-point embedding). Randomness comes from torch's global generator unless a
`generator` is passed.

An object with an empty ground-truth mask gets padding instead of a box, so that training never
sees a box with corners swapped around an empty region; its absence is learned through the
object-score loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sam2.utils.misc import mask_to_box

POSITIVE, NEGATIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, PADDING = 1, 0, 2, 3, -1

# Elements of the [rows, W, W] table the exact distance transform builds at once (memory cap).
_EDT_ELEMENTS_PER_CHUNK = 1 << 22


def sample_box_points(
    masks: Tensor,
    noise: float = 0.1,
    noise_bound: int = 20,
    top_left_label: int = BOX_TOP_LEFT,
    bottom_right_label: int = BOX_BOTTOM_RIGHT,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Box prompts around each mask, each corner jittered by up to `noise` x box size.

    Args:
        masks: `[B, 1, H, W]` bool ground truth.
        noise: maximum jitter as a fraction of the box width / height (SAM uses 0.1).
        noise_bound: maximum jitter in pixels.
    Returns:
        points `[B, 2, 2]` float (top-left, bottom-right corners, inside the image) and labels
        `[B, 2]` int32; empty masks get two padding points.
    """
    num_masks, _, height, width = masks.shape
    boxes = mask_to_box(masks).float()  # [B, 1, 4]
    if noise > 0.0:
        size = boxes[..., 2:] - boxes[..., :2]  # (w, h)
        max_shift = torch.minimum(size * noise, torch.tensor(float(noise_bound), device=masks.device))
        unit = torch.rand(num_masks, 1, 4, device=masks.device, generator=generator) * 2 - 1
        boxes = boxes + unit * max_shift.repeat(1, 1, 2)
        upper = torch.tensor([width, height, width, height], device=masks.device, dtype=boxes.dtype) - 1
        boxes = torch.minimum(boxes.clamp(min=0), upper)
    points = boxes.reshape(num_masks, 2, 2)
    labels = torch.tensor([top_left_label, bottom_right_label], dtype=torch.int32, device=masks.device)
    labels = labels.repeat(num_masks, 1)
    return _pad_empty_objects(masks, points, labels)


def _pad_empty_objects(masks: Tensor, points: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Replace the prompts of objects whose mask is empty by padding at (0, 0)."""
    empty = ~masks.flatten(1).any(dim=1)
    points = torch.where(empty[:, None, None], torch.zeros_like(points), points)
    labels = torch.where(empty[:, None], torch.full_like(labels, PADDING), labels)
    return points, labels


def _error_regions(gt_masks: Tensor, pred_masks: Tensor | None) -> tuple[Tensor, Tensor]:
    """False-positive and false-negative regions `[B, H, W]`; no prediction means empty."""
    if gt_masks.dtype != torch.bool or gt_masks.dim() != 4 or gt_masks.size(1) != 1:
        raise ValueError(f"gt_masks must be bool [B, 1, H, W], got {gt_masks.dtype} {tuple(gt_masks.shape)}")
    gt = gt_masks[:, 0]
    if pred_masks is None:
        return torch.zeros_like(gt), gt
    if pred_masks.dtype != torch.bool or pred_masks.shape != gt_masks.shape:
        raise ValueError(f"pred_masks must be bool {tuple(gt_masks.shape)}, got {pred_masks.dtype} {tuple(pred_masks.shape)}")
    pred = pred_masks[:, 0]
    return pred & ~gt, gt & ~pred


def _pixel_to_point(flat_index: Tensor, width: int) -> Tensor:
    return torch.stack([flat_index % width, flat_index // width], dim=-1).float()


def _uniform_picks(candidates: Tensor, num_pt: int, generator: torch.Generator | None) -> Tensor:
    """`num_pt` indices per row of the bool `candidates [B, N]`, uniform over its True entries.

    Inverse-CDF sampling on the running count of candidates: one uniform draw per click, where
    `torch.multinomial` draws an exponential for every pixel (4 % of a CPU training step).
    Every row must have a candidate.
    """
    running = candidates.cumsum(dim=1)
    total = running[:, -1:]
    unit = torch.rand(candidates.shape[0], num_pt, dtype=torch.float64, device=candidates.device, generator=generator)
    rank = torch.minimum((unit * total).long(), total - 1)  # 0-based, among the candidates
    return torch.searchsorted(running, rank + 1)  # the first index where the count reaches rank + 1


def sample_random_points_from_errors(
    gt_masks: Tensor, pred_masks: Tensor | None, num_pt: int = 1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """`num_pt` clicks per object, each uniform over the object's error pixels.

    A click in a false negative is positive, in a false positive negative. Where the prediction
    is already right, the click is a negative one uniform over the background (or, for an object
    filling the whole image, a positive one anywhere).

    Returns:
        points `[B, num_pt, 2]` float and labels `[B, num_pt]` int32.
    """
    false_pos, false_neg = _error_regions(gt_masks, pred_masks)
    num_masks, height, width = false_pos.shape
    gt = gt_masks[:, 0]
    if num_pt == 0:
        return torch.zeros(num_masks, 0, 2, device=gt.device), torch.zeros(num_masks, 0, dtype=torch.int32, device=gt.device)
    no_error = ~(false_pos | false_neg).flatten(1).any(dim=1)
    fallback_neg = ~gt & no_error[:, None, None]
    fallback_pos = gt & no_error[:, None, None] & ~(~gt).flatten(1).any(dim=1)[:, None, None]
    # Candidates: the negative-click pixels first, then the positive-click pixels.
    candidates = torch.cat([(false_pos | fallback_neg).flatten(1), (false_neg | fallback_pos).flatten(1)], dim=1)
    picks = _uniform_picks(candidates, num_pt, generator)
    labels = (picks >= height * width).to(torch.int32)
    return _pixel_to_point(picks % (height * width), width), labels


def squared_distance_to_background(masks: Tensor) -> Tensor:
    """Exact squared Euclidean distance of each pixel to the nearest pixel outside the mask.

    The image border counts as outside (as if padded by one background pixel), so a mask that
    touches the border is closest to it there.

    Args:
        masks: `[B, H, W]` bool.
    Returns:
        `[B, H, W]` int64, 0 outside the mask.
    """
    num_masks, height, width = masks.shape
    device = masks.device
    rows = torch.arange(height, device=device).view(1, height, 1)
    # Vertical distance to the nearest background pixel in the same column (pass 1 of 2).
    above = torch.where(~masks, rows, -1).cummax(dim=1).values
    below = torch.where(~masks, rows, height).flip(1).cummin(dim=1).values.flip(1)
    vertical = torch.minimum(rows - above, below - rows)  # [B, H, W]
    vertical_sq = vertical * vertical

    # Pass 2: along each row, the best column to go through; the border columns -1 and W are
    # background too.
    cols = torch.arange(width, device=device)
    col_gap_sq = (cols.view(-1, 1) - cols.view(1, -1)) ** 2  # [x, x']
    border_sq = torch.minimum((cols + 1) ** 2, (width - cols) ** 2)  # [x]
    flat = vertical_sq.reshape(num_masks * height, width)
    out = torch.empty_like(flat)
    chunk = max(1, _EDT_ELEMENTS_PER_CHUNK // (width * width))
    for start in range(0, flat.shape[0], chunk):
        rows_sq = flat[start : start + chunk]
        through = (rows_sq[:, None, :] + col_gap_sq[None]).amin(dim=-1)
        out[start : start + chunk] = torch.minimum(through, border_sq)
    return out.view(num_masks, height, width)


def sample_one_point_from_error_center(
    gt_masks: Tensor, pred_masks: Tensor | None, padding: bool = True
) -> tuple[Tensor, Tensor]:
    """One click per object at the pixel deepest inside its largest error (RITM / SAM eval).

    The false-negative and false-positive pixel farthest from its region's boundary wins (ties:
    the first in row-major order; between the two regions, the negative click). Deterministic.

    Args:
        padding: count the image border as the regions' boundary (the official setting). Only
            `True` is supported.
    Returns:
        points `[B, 1, 2]` float and labels `[B, 1]` int32.
    """
    if not padding:
        raise ValueError("sample_one_point_from_error_center supports padding=True only")
    false_pos, false_neg = _error_regions(gt_masks, pred_masks)
    width = false_pos.shape[-1]
    fn_depth, fn_index = squared_distance_to_background(false_neg).flatten(1).max(dim=1)
    fp_depth, fp_index = squared_distance_to_background(false_pos).flatten(1).max(dim=1)
    positive = fn_depth > fp_depth
    index = torch.where(positive, fn_index, fp_index)
    labels = positive.to(torch.int32)

    # Nothing to correct: a negative click deepest in the background (or a positive one deepest
    # in an object that fills the image), so the label is right either way.
    no_error = (fn_depth == 0) & (fp_depth == 0)
    if no_error.any():
        gt = gt_masks[:, 0]
        bg_depth, bg_index = squared_distance_to_background(~gt).flatten(1).max(dim=1)
        _, fg_index = squared_distance_to_background(gt).flatten(1).max(dim=1)
        has_background = bg_depth > 0
        index = torch.where(no_error, torch.where(has_background, bg_index, fg_index), index)
        labels = torch.where(no_error, (~has_background).to(torch.int32), labels)
    return _pixel_to_point(index, width)[:, None], labels[:, None]


def get_next_point(
    gt_masks: Tensor, pred_masks: Tensor | None, method: str, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One click per object from the errors of `pred_masks` (or from the ground truth if None).

    Args:
        method: `"uniform"` (random error pixel) or `"center"` (deepest error pixel).
    """
    if method == "uniform":
        return sample_random_points_from_errors(gt_masks, pred_masks, generator=generator)
    if method == "center":
        return sample_one_point_from_error_center(gt_masks, pred_masks)
    raise ValueError(f"unknown point sampling method {method!r}; use 'uniform' or 'center'")


def sample_initial_click(gt_masks: Tensor, method: str, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The first click on a prompted frame: a positive click in the object, padding if empty."""
    points, labels = get_next_point(gt_masks, None, method, generator=generator)
    return _pad_empty_objects(gt_masks, points, labels)
