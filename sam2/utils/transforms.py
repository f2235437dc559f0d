"""Moving images, prompts and masks between a user's image frame and the model's square input.

The model sees `resolution x resolution` normalised images; users give images of any size, points
and boxes in pixels of that image, and want masks back at that size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sam2.utils.misc import get_connected_components

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_to_tensor(image: np.ndarray | Image.Image) -> Tensor:
    """An RGB image (HxWx3 array or PIL image) as a `[3, H, W]` float32 tensor, uint8 scaled to [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(
            f"expected an RGB image as an HxWx3 numpy array or a PIL image, got {type(image).__name__} "
            f"with shape {shape}; for grayscale use `np.repeat(image[..., None], 3, axis=-1)`"
        )
    pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if pixels.dtype == torch.uint8:
        return pixels.float().div(255)
    return pixels.float()


class SAM2Transforms(nn.Module):
    """Resize + normalise images for the model, map prompts into its frame, and bring masks back.

    Args:
        resolution: side of the model's square input (`model.image_size`).
        mask_threshold: logit above which a pixel is foreground.
        max_hole_area: fill background regions of at most this many low-res pixels (0: off).
        max_sprinkle_area: remove foreground regions of at most this many low-res pixels (0: off).
    """

    def __init__(
        self,
        resolution: int,
        mask_threshold: float,
        max_hole_area: float = 0.0,
        max_sprinkle_area: float = 0.0,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.mask_threshold = mask_threshold
        self.max_hole_area = max_hole_area
        self.max_sprinkle_area = max_sprinkle_area
        self.mean = list(IMAGENET_MEAN)
        self.std = list(IMAGENET_STD)

    def _resize_normalize(self, image: Tensor) -> Tensor:
        """`[3, H, W]` in [0, 1] -> `[3, resolution, resolution]` normalised."""
        size = (self.resolution, self.resolution)
        resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        mean = torch.tensor(self.mean, dtype=resized.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=resized.dtype)[:, None, None]
        return (resized - mean) / std

    def __call__(self, image: np.ndarray | Image.Image) -> Tensor:
        """One RGB image -> `[3, resolution, resolution]`."""
        return self._resize_normalize(image_to_tensor(image))

    def forward_batch(self, images: Sequence[np.ndarray | Image.Image]) -> Tensor:
        """Several RGB images (any sizes) -> `[B, 3, resolution, resolution]`."""
        return torch.stack([self(image) for image in images], dim=0)

    def transform_coords(
        self,
        coords: Tensor,
        normalize: bool = False,
        orig_hw: tuple[int, int] | None = None,
    ) -> Tensor:
        """Points `[..., 2]` as (x, y) into the model's input frame.

        With `normalize=True` the points are pixels of an image of size `orig_hw`; otherwise they
        are already relative coordinates in [0, 1].
        """
        if normalize:
            if orig_hw is None:
                raise ValueError("transform_coords(normalize=True) needs orig_hw=(height, width) of the image")
            height, width = orig_hw
            coords = coords.clone()
            coords[..., 0] = coords[..., 0] / width
            coords[..., 1] = coords[..., 1] / height
        return coords * self.resolution

    def transform_boxes(
        self,
        boxes: Tensor,
        normalize: bool = False,
        orig_hw: tuple[int, int] | None = None,
    ) -> Tensor:
        """Boxes `[B, 4]` (x0, y0, x1, y1) into the model's frame, as corner pairs `[B, 2, 2]`."""
        return self.transform_coords(boxes.reshape(-1, 2, 2), normalize, orig_hw)

    def _remove_small_regions(self, masks: Tensor) -> Tensor:
        """Fill small holes and drop small sprinkles in `[B, C, h, w]` low-res logits.

        Both filters judge the input mask, so their order does not matter.
        """
        flat = masks.flatten(0, 1).unsqueeze(1)
        result = masks
        if self.max_hole_area > 0:
            labels, areas = get_connected_components(flat <= self.mask_threshold)
            is_hole = ((labels > 0) & (areas <= self.max_hole_area)).reshape_as(masks)
            result = torch.where(is_hole, self.mask_threshold + 10.0, result)
        if self.max_sprinkle_area > 0:
            labels, areas = get_connected_components(flat > self.mask_threshold)
            is_sprinkle = ((labels > 0) & (areas <= self.max_sprinkle_area)).reshape_as(masks)
            result = torch.where(is_sprinkle, self.mask_threshold - 10.0, result)
        return result

    def postprocess_masks(self, masks: Tensor, orig_hw: tuple[int, int]) -> Tensor:
        """Low-res mask logits `[B, C, h, w]` -> `[B, C, *orig_hw]` float32 logits.

        Small holes and sprinkles are cleaned at low resolution first, when enabled.
        """
        masks = masks.float()
        if self.max_hole_area > 0 or self.max_sprinkle_area > 0:
            masks = self._remove_small_regions(masks)
        return F.interpolate(masks, tuple(orig_hw), mode="bilinear", align_corners=False)
