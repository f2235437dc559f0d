"""Clip transforms: geometric and photometric augmentation applied to a `VideoDatapoint`.

Frames arrive as [3, H, W] uint8 tensors (PIL images are accepted too) and leave `ToTensorAPI`
as float32 in [0, 1]; masks are [H, W] uint8 throughout. With `consistent_transform=True` one
draw of random parameters serves every frame of the clip (and runs on the clip as one tensor);
otherwise each frame draws its own. Masks are resampled with nearest neighbour, so they stay
binary and aligned with their image. Random parameters come from the same generators as the
official transforms (`random` for coin flips and sizes, torch for affine and colour parameters).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from functools import partial

import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from training.dataset.clip_ops import (
    as_image_tensor,
    clip_tensor,
    image_fill,
    map_masks,
    same_size,
    set_clip,
    size_with_aspect_ratio,
    to_float,
)
from training.dataset.color_ops import (
    adjust_brightness_,
    adjust_contrast_,
    adjust_hue,
    adjust_saturation_,
    rgb_to_gray3,
)
from training.dataset.geometry import warp_affine, warp_images_pil, warp_masks_nearest
from training.utils.data_utils import Frame, VideoDatapoint

logger = logging.getLogger(__name__)

_INTERPOLATIONS = ("bilinear", "bicubic")
_MASK_INTERPOLATIONS = {"nearest": InterpolationMode.NEAREST_EXACT, "bilinear": InterpolationMode.BILINEAR}


def _groups(datapoint: VideoDatapoint, consistent: bool) -> list[list[Frame]]:
    """Frames that share one parameter draw: the whole clip, or each frame alone."""
    return [datapoint.frames] if consistent else [[f] for f in datapoint.frames]


def _map_images(frames: list[Frame], fn) -> None:
    """Apply `fn` ([N, 3, H, W] -> [N, 3, H', W']) to the frames' images, in one call when they share a size."""
    if same_size(frames):
        set_clip(frames, fn(clip_tensor(frames)))
    else:
        for frame in frames:
            frame.data = fn(as_image_tensor(frame.data)[None])[0]


class ComposeAPI:
    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, datapoint: VideoDatapoint, **kwargs) -> VideoDatapoint:
        for transform in self.transforms:
            datapoint = transform(datapoint, **kwargs)
        return datapoint

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomHorizontalFlip:
    def __init__(self, consistent_transform: bool, p: float = 0.5) -> None:
        self.p = p
        self.consistent_transform = consistent_transform

    def __call__(self, datapoint: VideoDatapoint, **kwargs) -> VideoDatapoint:
        for frames in _groups(datapoint, self.consistent_transform):
            if random.random() < self.p:
                _map_images(frames, lambda clip: clip.flip(-1))
                map_masks(frames, lambda masks: masks.flip(-1))
        return datapoint


class RandomResizeAPI:
    """Resize to a size drawn from `sizes`: the shorter side (capped by max_size), or a square.

    mask_interpolation: "nearest" (default) keeps masks exactly as labelled; "bilinear" rounds a
    bilinear resample of the 0/1 mask, as the official transform does.
    """

    def __init__(
        self,
        sizes: int | Iterable[int],
        consistent_transform: bool,
        max_size: int | None = None,
        square: bool = False,
        v2: bool = False,
        mask_interpolation: str = "nearest",
    ) -> None:
        self.sizes = [sizes] if isinstance(sizes, int) else list(sizes)
        if not self.sizes:
            raise ValueError("RandomResizeAPI needs at least one size")
        if mask_interpolation not in _MASK_INTERPOLATIONS:
            raise ValueError(f"mask_interpolation must be one of {sorted(_MASK_INTERPOLATIONS)}, got {mask_interpolation!r}")
        self.max_size = max_size
        self.square = square
        self.consistent_transform = consistent_transform
        self.v2 = v2
        self.mask_interpolation = _MASK_INTERPOLATIONS[mask_interpolation]

    def _target(self, frame: Frame, size: int) -> tuple[int, int]:
        if self.square:
            return size, size
        height, width = as_image_tensor(frame.data).shape[-2:]
        return size_with_aspect_ratio(int(height), int(width), size, self.max_size)

    def __call__(self, datapoint: VideoDatapoint, **kwargs) -> VideoDatapoint:
        for frames in _groups(datapoint, self.consistent_transform):
            size = random.choice(self.sizes)
            for group in [frames] if same_size(frames) else [[f] for f in frames]:
                target = list(self._target(group[0], size))
                _map_images(group, partial(self._resize_images, target=target))
                map_masks(group, partial(self._resize_masks, target=target))
        return datapoint

    @staticmethod
    def _resize_images(clip: torch.Tensor, target: list[int]) -> torch.Tensor:
        if list(clip.shape[-2:]) == target:
            return clip
        if clip.dtype == torch.uint8:
            # torch's vectorised uint8 antialiased resize wants channels-last input.
            clip = clip.contiguous(memory_format=torch.channels_last)
        return F.resize(clip, target, antialias=True)

    def _resize_masks(self, masks: torch.Tensor, target: list[int]) -> torch.Tensor:
        if list(masks.shape[-2:]) == target:
            return masks
        if self.mask_interpolation == InterpolationMode.BILINEAR:
            # Resample in float and round half to even, as the official transform does.
            resized = F.resize(masks.float(), target, interpolation=InterpolationMode.BILINEAR, antialias=True)
            return resized.round_().to(masks.dtype)
        return F.resize(masks, target, interpolation=self.mask_interpolation)


class RandomAffine:
    """Random rotation / scale / translation / shear, the same for a frame's image and masks.

    When an object's mask vanishes from the first frame the draw is retried (`num_tentatives`
    draws in all); if every draw loses an object the clip is left untransformed.
    image_mean fills the uncovered border, in 0-255 units.
    """

    def __init__(
        self,
        degrees: float | list[float],
        consistent_transform: bool,
        scale: list[float] | None = None,
        translate: list[float] | None = None,
        shear: float | list[float] | None = None,
        image_mean: Sequence[float] = (123, 116, 103),
        log_warning: bool = True,
        num_tentatives: int = 1,
        image_interpolation: str = "bicubic",
    ) -> None:
        if image_interpolation not in _INTERPOLATIONS:
            raise ValueError(f"image_interpolation must be one of {sorted(_INTERPOLATIONS)}, got {image_interpolation!r}")
        self.degrees = list(degrees) if isinstance(degrees, Sequence) else [-degrees, degrees]
        self.scale = scale
        self.shear = list(shear) if isinstance(shear, Sequence) else ([-shear, shear] if shear else None)
        self.translate = translate
        self.fill_img = image_mean
        self.consistent_transform = consistent_transform
        self.log_warning = log_warning
        self.num_tentatives = num_tentatives
        self.image_interpolation = image_interpolation

    def _draw(self, height: int, width: int) -> tuple:
        return T.RandomAffine.get_params(
            degrees=self.degrees, translate=self.translate, scale_ranges=self.scale, shears=self.shear,
            img_size=[width, height],
        )

    def __call__(self, datapoint: VideoDatapoint, **kwargs) -> VideoDatapoint:
        for _ in range(self.num_tentatives):
            if self._try_transform(datapoint):
                return datapoint
        if self.log_warning:
            logger.warning("RandomAffine skipped: every one of %d draws emptied a first-frame mask", self.num_tentatives)
        return datapoint

    def _try_transform(self, datapoint: VideoDatapoint) -> bool:
        """Transform in place and return True, or leave the datapoint untouched and return False."""
        height, width = as_image_tensor(datapoint.frames[0].data).shape[-2:]
        groups = _groups(datapoint, self.consistent_transform)
        params = [self._draw(int(height), int(width)) for _ in groups]
        warped_masks = []
        for frames, p in zip(groups, params):
            counts = [len(f.objects) for f in frames]
            masks = [o.segment for f in frames for o in f.objects]
            warped = warp_masks_nearest(torch.stack(masks), p).split(counts) if masks else [None] * len(frames)
            warped_masks.append(warped)
        first = warped_masks[0][0]
        if first is not None and len(first) and (first.flatten(1).amax(dim=1) == 0).any():
            return False  # an object left the first frame: nothing to track from there
        for frames, p, warped in zip(groups, params, warped_masks):
            for frame, masks in zip(frames, warped):
                for obj, mask in zip(frame.objects, masks if masks is not None else []):
                    obj.segment = mask
            _map_images(frames, partial(self._warp_images, params=p))
        return True

    def _warp_images(self, clip: torch.Tensor, params: tuple) -> torch.Tensor:
        fill = image_fill(self.fill_img, clip)
        if clip.dtype == torch.uint8:
            return warp_images_pil(clip, params, self.image_interpolation, fill)
        return warp_affine(clip, params, self.image_interpolation, fill)


_COLOR_OPS = {0: adjust_brightness_, 1: adjust_contrast_, 2: adjust_saturation_, 3: adjust_hue}


def _apply_color_steps(clip: torch.Tensor, steps: list) -> torch.Tensor:
    # uint8 frames become new float tensors here (one pass, with a leading brightness folded into
    # the scale); float frames are ours to modify in place.
    if not clip.is_floating_point():
        scale = 1.0 / 255.0
        if steps and steps[0][0] is adjust_brightness_:
            scale, steps = steps[0][1] / 255.0, steps[1:]
        clip = clip.contiguous().to(torch.float32).mul_(scale)
        if scale > 1.0 / 255.0:
            clip.clamp_(0, 1)
    for fn, factor in steps:
        clip = fn(clip, factor)
    return clip


class ColorJitter:
    """Brightness, contrast, saturation and hue changes in random order (float images after it).

    Each of brightness/contrast/saturation is a factor range [lo, hi] or a strength s for
    [max(0, 1 - s), 1 + s]; hue is a range, a strength h for [-h, h], or None.
    """

    def __init__(self, consistent_transform: bool, brightness, contrast, saturation, hue) -> None:
        self.consistent_transform = consistent_transform
        self.brightness = self._factor_range(brightness)
        self.contrast = self._factor_range(contrast)
        self.saturation = self._factor_range(saturation)
        if hue is None or isinstance(hue, Sequence):
            self.hue = None if hue is None else list(hue)
        else:
            self.hue = [-hue, hue]

    @staticmethod
    def _factor_range(value) -> list[float] | None:
        if value is None:
            return None
        if isinstance(value, Sequence):
            return list(value)
        return [max(0.0, 1 - value), 1 + value]

    def __call__(self, datapoint: VideoDatapoint, **kwargs) -> VideoDatapoint:
        for frames in _groups(datapoint, self.consistent_transform):
            order, brightness, contrast, saturation, hue = T.ColorJitter.get_params(
                self.brightness, self.contrast, self.saturation, self.hue
            )
            factors = {0: brightness, 1: contrast, 2: saturation, 3: hue}
            steps = [(_COLOR_OPS[i], factors[i]) for i in order.tolist() if factors[i] is not None]
            _map_images(frames, partial(_apply_color_steps, steps=steps))
        return datapoint


class RandomGrayscale:
    def __init__(self, consistent_transform: bool, p: float = 0.5) -> None:
        self.p = p
        self.consistent_transform = consistent_transform

    def __call__(self, datapoint: VideoDatapoint, **kwargs) -> VideoDatapoint:
        for frames in _groups(datapoint, self.consistent_transform):
            if random.random() < self.p:
                _map_images(frames, rgb_to_gray3)
        return datapoint


class ToTensorAPI:
    """Frames become float32 [3, H, W] tensors in [0, 1]."""

    def __init__(self, v2: bool = False) -> None:
        self.v2 = v2

    def __call__(self, datapoint: VideoDatapoint, **kwargs) -> VideoDatapoint:
        _map_images(datapoint.frames, to_float)
        return datapoint


class NormalizeAPI:
    """(image - mean) / std per channel, on float images in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], v2: bool = False) -> None:
        self.mean = list(mean)
        self.std = list(std)
        self.v2 = v2

    def __call__(self, datapoint: VideoDatapoint, **kwargs) -> VideoDatapoint:
        _map_images(datapoint.frames, lambda clip: F.normalize(to_float(clip), mean=self.mean, std=self.std, inplace=True))
        return datapoint


class RandomMosaicVideoAPI:
    """With probability `prob`, tile each frame as a grid_h x grid_w mosaic of its downsized copies.

    The objects' masks appear only in one randomly chosen target cell (the same for the whole
    clip); the other cells are distractors. With use_random_hflip each cell is mirrored with
    probability 0.5 (masks follow their cell).
    """

    def __init__(self, prob: float = 0.15, grid_h: int = 2, grid_w: int = 2, use_random_hflip: bool = False) -> None:
        self.prob = prob
        self.grid_h = grid_h
        self.grid_w = grid_w
        self.use_random_hflip = use_random_hflip

    def _cells(self, height: int, width: int) -> list[tuple[int, int, int, int, int, int]]:
        """(row, col, top, bottom, left, right) of every grid cell; integer splits like the official one."""
        return [
            (r, c, r * height // self.grid_h, (r + 1) * height // self.grid_h,
             c * width // self.grid_w, (c + 1) * width // self.grid_w)
            for r in range(self.grid_h)
            for c in range(self.grid_w)
        ]

    def __call__(self, datapoint: VideoDatapoint, **kwargs) -> VideoDatapoint:
        if random.random() > self.prob:
            return datapoint
        target = (random.randint(0, self.grid_h - 1), random.randint(0, self.grid_w - 1))
        if self.use_random_hflip:
            flips = torch.rand(self.grid_h, self.grid_w) < 0.5
        else:
            flips = torch.zeros(self.grid_h, self.grid_w, dtype=torch.bool)
        for frame in datapoint.frames:
            self._mosaic_frame(frame, target, flips)
        return datapoint

    def _mosaic_frame(self, frame: Frame, target: tuple[int, int], flips: torch.Tensor) -> None:
        image = as_image_tensor(frame.data)
        height, width = image.shape[-2:]
        out = torch.zeros_like(image)
        downsized: dict[tuple[int, int], torch.Tensor] = {}
        for row, col, top, bottom, left, right in self._cells(height, width):
            size = (bottom - top, right - left)
            if size not in downsized:
                downsized[size] = F.resize(image, list(size), antialias=True)
            cell = downsized[size]
            out[:, top:bottom, left:right] = cell.flip(-1) if flips[row, col] else cell
            if (row, col) == target and frame.objects:
                masks = torch.stack([o.segment for o in frame.objects])
                small = F.resize(masks.float(), list(size), antialias=True).round_().to(masks.dtype)
                placed = torch.zeros_like(masks)
                placed[:, top:bottom, left:right] = small.flip(-1) if flips[row, col] else small
                for obj, mask in zip(frame.objects, placed):
                    obj.segment = mask
        frame.data = out
