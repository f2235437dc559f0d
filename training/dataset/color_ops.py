"""Photometric adjustments on float clips in [0, 1], in place.

The formulas of torchvision's float `adjust_brightness/contrast/saturation` (equal up to float
rounding), without their temporaries: on an 8 x 3 x 1024 x 1024 clip each op is a few passes
over memory. Inputs must lie in [0, 1] (as frames coming from uint8 do). Callers own the
tensors they pass (the dataset hands transforms fresh frames).
"""

from __future__ import annotations

import torchvision.transforms.v2.functional as F
from torch import Tensor


def _gray(clip: Tensor) -> Tensor:
    """[..., 1, H, W] ITU-R 601 luma of [..., 3, H, W] RGB."""
    r, g, b = clip.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend_(clip: Tensor, other: Tensor | float, ratio: float) -> Tensor:
    """clip <- clamp(ratio * clip + (1 - ratio) * other, 0, 1), for clip and other in [0, 1]."""
    if isinstance(other, Tensor):
        clip.lerp_(other, 1.0 - ratio)
    else:
        clip.mul_(ratio)
        if other != 0:
            clip.add_(other * (1.0 - ratio))
    # A blend with ratio <= 1 stays between its two [0, 1] ends: only extrapolation can overflow.
    return clip.clamp_(0, 1) if ratio > 1 else clip
def adjust_brightness_(clip: Tensor, factor: float) -> Tensor:
    return _blend_(clip, 0.0, factor)


def adjust_contrast_(clip: Tensor, factor: float) -> Tensor:
    # The blend target is each frame's mean gray level, which is the gray of the channel means.
    channel_means = clip.mean(dim=(-2, -1), keepdim=True)
    return _blend_(clip, _gray(channel_means), factor)


def adjust_saturation_(clip: Tensor, factor: float) -> Tensor:
    return _blend_(clip, _gray(clip), factor)


def adjust_hue(clip: Tensor, factor: float) -> Tensor:
    return F.adjust_hue(clip, factor)


def rgb_to_gray3(clip: Tensor) -> Tensor:
    """[..., 3, H, W] -> gray replicated on 3 channels."""
    return _gray(clip).expand_as(clip).contiguous() if clip.is_floating_point() else F.rgb_to_grayscale(
        clip, num_output_channels=3
    )
