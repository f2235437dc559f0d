"""Affine warps of clip images and masks, in torchvision's geometric convention.

Images (uint8) are warped through PIL, the operation the official transform runs, and which is
several times faster than a float grid_sample. Masks are warped with nearest neighbour by
gathering from a source-index map computed once per draw: the same pixels torchvision's
grid_sample picks, for all objects and frames at once (bit-packed, 8 objects per byte plane).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.functional as F1
from PIL import Image as PILImage
from torch import Tensor


def inverse_affine_matrix(
    angle: float, translate: list[float], scale: float, shear: list[float]
) -> list[float]:
    """Output-to-input 2x3 matrix (row-major) of a rotation/shear/scale about the image centre,
    followed by a translation, in pixel units relative to the centre (torchvision's convention)."""
    rot = math.radians(angle)
    shear_x, shear_y = math.radians(shear[0]), math.radians(shear[1])
    tx, ty = translate
    # Forward map M = T * R * Sh * S; invert R * Sh analytically (its determinant is cos(rot)).
    a = math.cos(rot - shear_y) / math.cos(shear_y)
    b = -math.cos(rot - shear_y) * math.tan(shear_x) / math.cos(shear_y) - math.sin(rot)
    c = math.sin(rot - shear_y) / math.cos(shear_y)
    d = -math.sin(rot - shear_y) * math.tan(shear_x) / math.cos(shear_y) + math.cos(rot)
    m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
    m[2] = m[0] * -tx + m[1] * -ty
    m[5] = m[3] * -tx + m[4] * -ty
    return m


def warp_affine(clip: Tensor, params: tuple, mode: str, fill: list[float]) -> Tensor:
    """Affine-warp [N, C, H, W] images (float or uint8) with grid_sample; the path for float images.

    params are `T.RandomAffine.get_params` output; mode is "bilinear" or "bicubic"; pixels that map
    from outside the image get `fill` (blended at the border as torchvision does).
    """
    n, channels, height, width = clip.shape
    grid = _output_to_input_grid(params, height, width).unsqueeze(0).expand(n, height, width, 2)

    source = clip.to(torch.float32)
    source = torch.cat([source, torch.ones(n, 1, height, width)], dim=1)
    warped = torch.nn.functional.grid_sample(source, grid, mode=mode, padding_mode="zeros", align_corners=False)
    inside = warped[:, -1:].clamp_(0, 1)
    fill_t = torch.tensor(fill, dtype=torch.float32).reshape(1, -1, 1, 1)
    out = warped[:, :channels] * inside + (1 - inside) * fill_t
    if clip.is_floating_point():
        return out.to(clip.dtype)
    return out.round_().clamp_(0, 255).to(clip.dtype)



def _output_to_input_grid(params: tuple, height: int, width: int) -> Tensor:
    """[H, W, 2] normalised input coordinates (grid_sample convention) of each output pixel."""
    angle, translate, scale, shear = params
    m = inverse_affine_matrix(angle, [float(v) for v in translate], scale, [float(v) for v in shear])
    theta = torch.tensor([[m[0], m[1], m[2]], [m[3], m[4], m[5]]], dtype=torch.float32)
    # Built exactly as torchvision builds it (linspace, then one matmul) so rounding agrees bit for bit.
    base = torch.empty(height, width, 3, dtype=torch.float32)
    base[..., 0].copy_(torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, steps=width))
    base[..., 1].copy_(torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, steps=height).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 0) / torch.tensor([0.5 * width, 0.5 * height], dtype=torch.float32)
    return base.view(1, height * width, 3).bmm(rescaled.unsqueeze(0)).view(height, width, 2)


def nearest_source_index(params: tuple, height: int, width: int) -> tuple[Tensor, Tensor]:
    """([H * W] flat source pixel, [H * W] bool inside) of each output pixel under nearest sampling."""
    grid = _output_to_input_grid(params, height, width)
    ix = torch.round(((grid[..., 0] + 1) * width - 1) / 2)
    iy = torch.round(((grid[..., 1] + 1) * height - 1) / 2)
    inside = (ix >= 0) & (ix <= width - 1) & (iy >= 0) & (iy <= height - 1)
    index = iy.clamp_(0, height - 1) * width + ix.clamp_(0, width - 1)
    return index.long().reshape(-1), inside.reshape(-1)


def pack_masks(masks: Tensor) -> Tensor:
    """[N, H, W] 0/1 uint8 -> [ceil(N / 8), H, W] uint8, mask k in bit k % 8 of plane k // 8."""
    planes = []
    for chunk in masks.split(8):
        bits = torch.tensor([1 << k for k in range(len(chunk))], dtype=torch.uint8).view(-1, 1, 1)
        planes.append((chunk.bool().to(torch.uint8) * bits).sum(0, dtype=torch.uint8))
    return torch.stack(planes)


def unpack_masks(planes: Tensor, num_masks: int) -> Tensor:
    """Inverse of `pack_masks`: [P, H, W] uint8 -> [num_masks, H, W] 0/1 uint8."""
    out = torch.empty((num_masks, *planes.shape[1:]), dtype=torch.uint8)
    for p, plane in enumerate(planes):
        chunk = out[8 * p : 8 * p + 8]
        shifts = torch.arange(len(chunk), dtype=torch.uint8).view(-1, 1, 1)
        torch.bitwise_and(torch.bitwise_right_shift(plane, shifts), 1, out=chunk)
    return out


def warp_masks_nearest(masks: Tensor, params: tuple) -> Tensor:
    """Affine-warp [N, H, W] 0/1 masks with nearest neighbour; outside pixels become 0."""
    num, height, width = masks.shape
    index, inside = nearest_source_index(params, height, width)
    planes = pack_masks(masks).reshape(-1, height * width)
    warped = planes[:, index] * inside.to(torch.uint8)
    return unpack_masks(warped.reshape(-1, height, width), num)


def warp_images_pil(clip: Tensor, params: tuple, mode: str, fill: list[float]) -> Tensor:
    """Affine-warp [N, 3, H, W] uint8 images through PIL; returns a channels-last [N, 3, H, W] uint8 view."""
    resample = {"bilinear": F1.InterpolationMode.BILINEAR, "bicubic": F1.InterpolationMode.BICUBIC}[mode]
    angle, translate, scale, shear = params
    fill_int = [round(v) for v in fill]
    out = np.empty((clip.shape[0], clip.shape[2], clip.shape[3], 3), dtype=np.uint8)
    for i, image in enumerate(clip):
        pil = PILImage.fromarray(image.permute(1, 2, 0).contiguous().numpy())
        out[i] = np.asarray(F1.affine(pil, angle, translate, scale, shear, interpolation=resample, fill=fill_int))
    return torch.from_numpy(out).permute(0, 3, 1, 2)
