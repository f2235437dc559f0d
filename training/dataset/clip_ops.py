"""Tensor plumbing for clip transforms: frames as one [T, 3, H, W] tensor, masks as [T, O, H, W].

Transforms with `consistent_transform` apply one set of random parameters to every frame, so
they run once on the whole clip tensor instead of frame by frame. Frames keep views into the
clip tensor afterwards, so the next transform gets it back without a copy.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor

from training.utils.data_utils import Frame


def as_image_tensor(data: Tensor | PILImage.Image) -> Tensor:
    """[3, H, W] tensor for a frame's data; PIL images become uint8 tensors."""
    if isinstance(data, PILImage.Image):
        return torch.from_numpy(np.array(data.convert("RGB"))).permute(2, 0, 1).contiguous()
    return data


def clip_tensor(frames: list[Frame]) -> Tensor:
    """[T, 3, H, W] images of equal-sized frames, without a copy when they are views of one clip."""
    datas = [as_image_tensor(f.data) for f in frames]
    first = datas[0]
    if len(datas) == 1:
        return first.unsqueeze(0)
    step = datas[1].data_ptr() - first.data_ptr()
    storage = first.untyped_storage().data_ptr()
    evenly_spaced_views = step > 0 and all(
        d.shape == first.shape and d.stride() == first.stride() and d.dtype == first.dtype
        and d.untyped_storage().data_ptr() == storage and d.data_ptr() - first.data_ptr() == i * step
        for i, d in enumerate(datas)
    )
    if evenly_spaced_views and step % first.element_size() == 0:
        frame_stride = step // first.element_size()
        return first.as_strided((len(datas), *first.shape), (frame_stride, *first.stride()), first.storage_offset())
    return torch.stack(datas)


def set_clip(frames: list[Frame], clip: Tensor) -> None:
    for frame, image in zip(frames, clip.unbind(0)):
        frame.data = image


def same_size(frames: list[Frame]) -> bool:
    sizes = {tuple(as_image_tensor(f.data).shape[-2:]) for f in frames}
    return len(sizes) == 1


def frame_masks(frame: Frame) -> Tensor | None:
    """[O, H, W] masks of a frame's objects (None when it has none)."""
    if not frame.objects:
        return None
    return torch.stack([obj.segment for obj in frame.objects])


def set_frame_masks(frame: Frame, masks: Tensor) -> None:
    for obj, mask in zip(frame.objects, masks.unbind(0)):
        obj.segment = mask


def map_masks(frames: list[Frame], fn) -> None:
    """Apply `fn` ([N, H, W] uint8 -> [N, H', W']) to all object masks of `frames` in one call."""
    counts = [len(f.objects) for f in frames]
    if sum(counts) == 0:
        return
    stacked = torch.cat([frame_masks(f) for f, n in zip(frames, counts) if n])
    out = fn(stacked)
    for frame, chunk in zip([f for f, n in zip(frames, counts) if n], out.split([n for n in counts if n])):
        set_frame_masks(frame, chunk)


def image_fill(mean: tuple[float, ...] | list[float], image: Tensor) -> list[float]:
    """`mean` is given in 0-255 units, as for uint8 images; scale it for float images."""
    return [float(m) for m in mean] if not image.is_floating_point() else [float(m) / 255.0 for m in mean]


def size_with_aspect_ratio(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(h, w) whose shorter side is `size` (shrunk so the longer side stays <= max_size)."""
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = max_size * short / long
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return round(size * height / width), round(size)
    return round(size), round(size * width / height)


def to_float(clip: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1]; float images unchanged."""
    if clip.is_floating_point():
        return clip
    # Converting a contiguous uint8 tensor is much faster than converting a channels-last one,
    # and the float ops that follow prefer the planar layout too.
    return clip.contiguous().to(torch.float32).div_(255.0)

