"""Small inference helpers: connected components, hole filling, boxes from masks, point prompts.

Everything here runs on any device with plain PyTorch: the official package computes connected
components with an optional CUDA extension, which we replace by a label-propagation routine
(`get_connected_components`) that gives the same components and areas.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from sam2.utils.video_frames import AsyncVideoFrameLoader, load_video_frames

__all__ = [
    "AsyncVideoFrameLoader",
    "concat_points",
    "fill_holes_in_mask_scores",
    "get_connected_components",
    "get_sdpa_settings",
    "load_video_frames",
    "mask_to_box",
]


def get_sdpa_settings() -> tuple[bool, bool, bool]:
    """Which attention kernels to prefer: `(old_gpu, use_flash_attn, math_kernel_on)`.

    Flash attention needs an Ampere (compute capability 8.0) or newer GPU; without one, or on
    CPU, the math kernel stays enabled as a fallback.
    """
    if not torch.cuda.is_available():
        return True, False, True
    major = torch.cuda.get_device_properties(0).major
    use_flash_attn = major >= 8
    if not use_flash_attn:
        warnings.warn(
            f"Flash Attention is disabled: it needs a GPU with CUDA capability >= 8.0 (Ampere), "
            f"this one has {major}.x.",
            UserWarning,
            stacklevel=2,
        )
    return major < 7, use_flash_attn, not use_flash_attn


def _neighbourhood_min(labels: Tensor, foreground: Tensor) -> Tensor:
    """Smallest label among each foreground pixel's 8-neighbourhood (itself included).

    `labels` is float64 so that pooling stays exact for indices up to 2**53; background pixels
    carry +inf and never win.
    """
    big = torch.where(foreground, labels, torch.full_like(labels, float("inf")))
    pooled = -F.max_pool2d(-big, kernel_size=3, stride=1, padding=1)
    return torch.where(foreground, pooled, big)


@torch.no_grad()
def get_connected_components(mask: Tensor) -> tuple[Tensor, Tensor]:
    """8-connected components of binary masks.

    Args:
        mask: `[N, 1, H, W]`, non-zero marks foreground.

    Returns:
        labels: `[N, 1, H, W]` int32, 0 on background; on foreground 1 + the row-major index
            (within its image) of the component's first pixel, so every component has one label.
        counts: `[N, 1, H, W]` int32, the area of the pixel's component, 0 on background.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"get_connected_components expects masks of shape [N, 1, H, W], got {tuple(mask.shape)}")
    num_masks, _, height, width = mask.shape
    foreground = mask.bool()
    num_pixels = num_masks * height * width
    # Union-find over flat pixel indices: each round hooks every root onto the smallest root
    # seen next to any of its pixels, then compresses paths, so components merge in a number
    # of rounds that grows with log(size) rather than with the component's diameter.
    parent = torch.arange(num_pixels, dtype=torch.int64, device=mask.device)
    fg_flat = foreground.flatten()
    while True:
        roots = parent.view(num_masks, 1, height, width)
        neighbour = _neighbourhood_min(roots.double(), foreground).long()
        needs_hook = foreground & (neighbour < roots)
        if not bool(needs_hook.any()):
            break
        parent.scatter_reduce_(0, roots[needs_hook], neighbour[needs_hook], reduce="amin")
        while True:
            grand_parent = parent[parent]
            if torch.equal(grand_parent, parent):
                break
            parent = grand_parent
    areas = torch.bincount(parent[fg_flat], minlength=num_pixels)
    counts = torch.where(fg_flat, areas[parent], 0)
    image_offset = torch.arange(num_masks, device=mask.device).repeat_interleave(height * width) * height * width
    labels = torch.where(fg_flat, parent - image_offset + 1, 0)
    shape = (num_masks, 1, height, width)
    return labels.view(shape).int(), counts.view(shape).int()


def fill_holes_in_mask_scores(mask: Tensor, max_area: int) -> Tensor:
    """Turn small background regions of mask logits into foreground.

    Background is every pixel with a score <= 0. A background component (8-connected) of at most
    `max_area` pixels gets the small positive score 0.1; other pixels keep their score. Note that
    a small background region touching the border counts as well, as in the official post-process.

    Args:
        mask: `[N, 1, H, W]` mask logits.
        max_area: the largest area, in pixels, that is filled; must be positive.

    Returns:
        `[N, 1, H, W]` mask logits with the holes filled.
    """
    if max_area <= 0:
        raise ValueError(
            f"max_area must be positive to fill holes, got {max_area}; skip the call to keep masks as they are"
        )
    labels, areas = get_connected_components(mask <= 0)
    is_hole = (labels > 0) & (areas <= max_area)
    return torch.where(is_hole, torch.tensor(0.1, dtype=mask.dtype, device=mask.device), mask)


def mask_to_box(masks: Tensor) -> Tensor:
    """Tight bounding boxes of boolean masks.

    Args:
        masks: `[B, 1, H, W]` bool.

    Returns:
        `[B, 1, 4]` int32 boxes `(x_min, y_min, x_max, y_max)` in pixels, inclusive; an empty
        mask gives `(W, H, -1, -1)`.
    """
    _, _, height, width = masks.shape
    cols = torch.arange(width, device=masks.device, dtype=torch.int32).view(1, 1, 1, width)
    rows = torch.arange(height, device=masks.device, dtype=torch.int32).view(1, 1, height, 1)
    x_min = torch.where(masks, cols, width).flatten(-2).amin(-1)
    x_max = torch.where(masks, cols, -1).flatten(-2).amax(-1)
    y_min = torch.where(masks, rows, height).flatten(-2).amin(-1)
    y_max = torch.where(masks, rows, -1).flatten(-2).amax(-1)
    return torch.stack((x_min, y_min, x_max, y_max), dim=-1)


def concat_points(
    old_point_inputs: dict[str, Tensor] | None, new_points: Tensor, new_labels: Tensor
) -> dict[str, Tensor]:
    """Append clicks to a frame's point prompt.

    Args:
        old_point_inputs: `{"point_coords": [B, N, 2], "point_labels": [B, N]}` or None.
        new_points: `[B, M, 2]` coordinates in the model's input frame.
        new_labels: `[B, M]` labels (1 positive, 0 negative, 2/3 box corners).

    Returns:
        `{"point_coords": [B, N + M, 2], "point_labels": [B, N + M]}`, old clicks first.
    """
    if old_point_inputs is None:
        return {"point_coords": new_points, "point_labels": new_labels}
    return {
        "point_coords": torch.cat([old_point_inputs["point_coords"], new_points], dim=1),
        "point_labels": torch.cat([old_point_inputs["point_labels"], new_labels], dim=1),
    }
