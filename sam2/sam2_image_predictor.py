"""Promptable segmentation of still images: embed an image once, then ask for masks many times."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sam2.modeling.sam2_base import SAM2Base
from sam2.utils.transforms import SAM2Transforms

ArrayLike = np.ndarray | Tensor | Sequence
logger = logging.getLogger(__name__)
# Low-res logits handed back for the next round are clamped, as the official predictor does, so a
# mask fed back as `mask_input` never carries extreme scores into the prompt encoder.
LOW_RES_LOGIT_LIMIT = 32.0


class SAM2ImagePredictor:
    """SAM 2 on single images (or a batch of them).

    Args:
        sam_model: a built `SAM2Base` (e.g. from `build_sam2`).
        mask_threshold: logit above which a pixel is foreground in the returned binary masks.
        max_hole_area: fill background holes up to this many low-res pixels (0: off).
        max_sprinkle_area: remove foreground specks up to this many low-res pixels (0: off).
    """

    def __init__(
        self,
        sam_model: SAM2Base,
        mask_threshold: float = 0.0,
        max_hole_area: float = 0.0,
        max_sprinkle_area: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.model = sam_model
        self.mask_threshold = mask_threshold
        self._transforms = SAM2Transforms(
            resolution=sam_model.image_size,
            mask_threshold=mask_threshold,
            max_hole_area=max_hole_area,
            max_sprinkle_area=max_sprinkle_area,
        )
        self.reset_predictor()

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs: Any) -> SAM2ImagePredictor:
        """Build a predictor from a local checkpoint file (or a folder holding one).

        Nothing is downloaded: a Hugging Face hub id raises with instructions. `mask_threshold`,
        `max_hole_area` and `max_sprinkle_area` go to the predictor, other keywords (e.g.
        `device`) to `build_sam2`.
        """
        from sam2.build_sam import build_sam2_hf

        predictor_keys = ("mask_threshold", "max_hole_area", "max_sprinkle_area")
        predictor_kwargs = {key: kwargs.pop(key) for key in predictor_keys if key in kwargs}
        return cls(build_sam2_hf(model_id, **kwargs), **predictor_kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_predictor(self) -> None:
        """Forget the current image(s) and their embeddings."""
        self._is_image_set = False
        self._is_batch = False
        self._features: dict[str, Any] | None = None
        self._orig_hw: list[tuple[int, int]] | None = None

    # ------------------------------------------------------------------ embedding
    @torch.no_grad()
    def _embed(self, images: Tensor) -> dict[str, Any]:
        """`[B, 3, S, S]` model inputs -> `{"image_embed": [B, C, h, w], "high_res_feats": [...]}`."""
        backbone_out = self.model.forward_image(images.to(self.device))
        _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
        # Video training always adds the no-memory embedding to the lowest-resolution level of an
        # unprompted frame; a still image is such a frame.
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        batch = images.shape[0]
        maps = [feat.permute(1, 2, 0).reshape(batch, -1, *size) for feat, size in zip(vision_feats, feat_sizes)]
        return {"image_embed": maps[-1], "high_res_feats": maps[:-1]}

    def set_image(self, image: np.ndarray | Image.Image) -> None:
        """Embed one RGB image (HxWx3 uint8 array or PIL image) for `predict`."""
        self.reset_predictor()
        if isinstance(image, np.ndarray):
            orig_hw = tuple(image.shape[:2])
        elif isinstance(image, Image.Image):
            orig_hw = (image.height, image.width)
        else:
            raise TypeError(f"set_image takes an HxWx3 numpy array or a PIL image, got {type(image).__name__}")
        logger.info("Computing image embeddings for the provided image...")
        self._features = self._embed(self._transforms(image)[None])
        self._orig_hw = [orig_hw]
        self._is_image_set = True

    def set_image_batch(self, image_list: Sequence[np.ndarray]) -> None:
        """Embed several RGB images (HxWx3 arrays, sizes may differ) for `predict_batch`."""
        self.reset_predictor()
        if not isinstance(image_list, (list, tuple)) or not image_list:
            raise TypeError(
                f"set_image_batch takes a non-empty list of HxWx3 numpy arrays, got {type(image_list).__name__}"
            )
        for index, image in enumerate(image_list):
            if not isinstance(image, np.ndarray):
                raise TypeError(
                    f"image {index} of the batch is a {type(image).__name__}; expected an HxWx3 numpy array"
                )
        logger.info("Computing image embeddings for the provided images...")
        self._features = self._embed(self._transforms.forward_batch(image_list))
        self._orig_hw = [tuple(image.shape[:2]) for image in image_list]
        self._is_image_set = True
        self._is_batch = True

    def get_image_embedding(self) -> Tensor:
        """The embedding of the current image(s), `[B, C, h, w]` (C=256, h=w=64 for 1024 px)."""
        self._require_image("get_image_embedding", "set_image")
        return self._features["image_embed"]

    def _require_image(self, method: str, setter: str) -> None:
        if not self._is_image_set:
            raise RuntimeError(f"call .{setter}(...) before .{method}(...): no image is set")

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        point_coords: ArrayLike | None = None,
        point_labels: ArrayLike | None = None,
        box: ArrayLike | None = None,
        mask_input: ArrayLike | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts on the image given to `set_image`.

        Args:
            point_coords: `[N, 2]` (or `[B, N, 2]` for B objects) clicks as (x, y) pixels.
            point_labels: `[N]` (or `[B, N]`) 1 foreground, 0 background.
            box: `[4]` (or `[B, 4]`) box as (x0, y0, x1, y1) pixels.
            mask_input: `[1, h, w]` (or `[B, 1, h, w]`) low-res logits from an earlier call.
            multimask_output: return 3 candidate masks instead of 1 (good for a single click).
            return_logits: return mask logits instead of binary masks.
            normalize_coords: coordinates are pixels of the original image (else already in [0, 1]).

        Returns:
            masks `[C, H, W]` (`[B, C, H, W]` for several objects) float32, binary unless
            `return_logits`; IoU predictions `[C]`; low-res logits `[C, h, w]`.
        """
        self._require_image("predict", "set_image")
        prompts = self._prep_prompts(point_coords, point_labels, box, mask_input, normalize_coords)
        masks, ious, low_res = self._predict(*prompts, multimask_output=multimask_output, return_logits=return_logits)
        return _to_numpy(masks), _to_numpy(ious), _to_numpy(low_res)

    def predict_batch(
        self,
        point_coords_batch: Sequence[ArrayLike] | None = None,
        point_labels_batch: Sequence[ArrayLike] | None = None,
        box_batch: Sequence[ArrayLike] | None = None,
        mask_input_batch: Sequence[ArrayLike] | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """`predict` for every image given to `set_image_batch`: per-image prompt lists in, per-image
        lists of (masks, IoU predictions, low-res logits) out."""
        if not self._is_batch:
            raise RuntimeError(
                "predict_batch needs images set with .set_image_batch(...); use .predict() after .set_image()"
            )
        self._require_image("predict_batch", "set_image_batch")
        results: tuple[list, list, list] = ([], [], [])
        for img_idx in range(len(self._orig_hw)):
            per_image = [
                None if batch is None else batch[img_idx]
                for batch in (
                    point_coords_batch,
                    point_labels_batch,
                    box_batch,
                    mask_input_batch,
                )
            ]
            prompts = self._prep_prompts(*per_image, normalize_coords, img_idx=img_idx)
            outputs = self._predict(
                *prompts,
                multimask_output=multimask_output,
                return_logits=return_logits,
                img_idx=img_idx,
            )
            for store, value in zip(results, outputs):
                store.append(_to_numpy(value))
        return results

    def _prep_prompts(
        self,
        point_coords: ArrayLike | None,
        point_labels: ArrayLike | None,
        box: ArrayLike | None,
        mask_logits: ArrayLike | None,
        normalize_coords: bool,
        img_idx: int = -1,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """User prompts -> model-frame tensors `(coords [B, N, 2], labels [B, N], boxes [B, 2, 2], masks [B, 1, h, w])`."""
        orig_hw = self._orig_hw[img_idx]
        coords = labels = boxes = masks = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords (1 foreground, 0 background per point)")
            points = torch.as_tensor(point_coords, dtype=torch.float, device=self.device)
            coords = self._transforms.transform_coords(points, normalize=normalize_coords, orig_hw=orig_hw)
            labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)
            if coords.dim() == 2:
                coords, labels = coords[None], labels[None]
        if box is not None:
            box_tensor = torch.as_tensor(box, dtype=torch.float, device=self.device)
            boxes = self._transforms.transform_boxes(box_tensor, normalize=normalize_coords, orig_hw=orig_hw)
        if mask_logits is not None:
            masks = torch.as_tensor(mask_logits, dtype=torch.float, device=self.device)
            if masks.dim() == 3:
                masks = masks[None]
        return coords, labels, boxes, masks

    @torch.no_grad()
    def _predict(
        self,
        point_coords: Tensor | None,
        point_labels: Tensor | None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        *,
        multimask_output: bool = True,
        return_logits: bool = False,
        img_idx: int = -1,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decode masks for model-frame prompts on image `img_idx`.

        Returns masks `[B, C, H, W]` at the original size, IoU predictions `[B, C]` and low-res
        logits `[B, C, h, w]` clamped to +-32.
        """
        points = _merge_box_into_points(point_coords, point_labels, boxes)
        sparse, dense = self.model.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
        image_embed = self._features["image_embed"][img_idx].unsqueeze(0)
        high_res = [level[img_idx].unsqueeze(0) for level in self._features["high_res_feats"]]
        low_res, ious, _, _ = self.model.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            # several objects on one image: the decoder repeats the image embedding per object
            repeat_image=points is not None and points[0].shape[0] > 1,
            high_res_features=high_res,
        )
        masks = self._transforms.postprocess_masks(low_res, self._orig_hw[img_idx])
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, ious, low_res.clamp(-LOW_RES_LOGIT_LIMIT, LOW_RES_LOGIT_LIMIT)


def _merge_box_into_points(
    coords: Tensor | None, labels: Tensor | None, boxes: Tensor | None
) -> tuple[Tensor, Tensor] | None:
    """SAM 2 takes a box as two leading points labelled 2 (top-left) and 3 (bottom-right)."""
    if boxes is None:
        return None if coords is None else (coords, labels)
    corners = boxes.reshape(-1, 2, 2)
    corner_labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).repeat(corners.shape[0], 1)
    if coords is None:
        return corners, corner_labels
    return torch.cat([corners, coords], dim=1), torch.cat([corner_labels, labels], dim=1)


def _to_numpy(value: Tensor) -> np.ndarray:
    """Drop a leading batch of one and move to a float32 numpy array (binary masks become 0/1)."""
    return value.squeeze(0).float().detach().cpu().numpy()
