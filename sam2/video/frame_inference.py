"""Per-frame model calls of the video predictor, and the merging of objects' outputs on a frame.

`FrameInferenceMixin` is mixed into `SAM2VideoPredictor` (a `SAM2Base`): it runs `track_step` or
the memory encoder for the objects of one frame, keeps the compact per-frame outputs the session
stores, and assembles all objects' masks of a frame at the resolution asked for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sam2.modeling.sam2_base import NO_OBJ_SCORE
from sam2.utils.misc import fill_holes_in_mask_scores
from sam2.video.session import FrameOutput, InferenceState, storage_key


class FrameInferenceMixin:
    """Model calls on single frames; the host is a `SAM2Base` with the video predictor's options
    (`fill_hole_area`, `non_overlap_masks`)."""

    fill_hole_area: int
    non_overlap_masks: bool

    def _get_image_feature(
        self, inference_state: InferenceState, frame_idx: int, batch_size: int
    ) -> tuple[Tensor, dict[str, Any], list[Tensor], list[Tensor], list[tuple[int, int]]]:
        """Backbone features of a frame, repeated for `batch_size` objects.

        Returns `(image [B, 3, S, S], backbone_out, vision_feats, vision_pos_embeds, feat_sizes)`
        as `_prepare_backbone_features` gives them. Only the latest frame's features are cached,
        which serves repeated clicks on one frame.
        """
        image, backbone_out = inference_state.cached_features.get(frame_idx, (None, None))
        if backbone_out is None:
            image = inference_state.images[frame_idx].to(inference_state.device).float().unsqueeze(0)
            backbone_out = self.forward_image(image)
            inference_state.cached_features = {frame_idx: (image, backbone_out)}
        expanded = {
            "backbone_fpn": [feat.expand(batch_size, -1, -1, -1) for feat in backbone_out["backbone_fpn"]],
            "vision_pos_enc": [pos.expand(batch_size, -1, -1, -1) for pos in backbone_out["vision_pos_enc"]],
        }
        return (image.expand(batch_size, -1, -1, -1),) + tuple(self._prepare_backbone_features(expanded))

    def _memory_storage_dtype(self, features: Tensor) -> torch.dtype:
        """bfloat16 under autocast, as the official predictor stores memories; else as computed."""
        return torch.bfloat16 if torch.is_autocast_enabled(features.device.type) else features.dtype

    def _run_single_frame_inference(
        self,
        inference_state: InferenceState,
        output_dict: dict[str, dict[int, FrameOutput]],
        frame_idx: int,
        batch_size: int,
        is_init_cond_frame: bool,
        point_inputs: dict[str, Tensor] | None,
        mask_inputs: Tensor | None,
        reverse: bool,
        run_mem_encoder: bool,
        prev_sam_mask_logits: Tensor | None = None,
    ) -> tuple[FrameOutput, Tensor]:
        """`track_step` on one frame; returns the compact stored output and the mask logits on the
        compute device (holes filled when `fill_hole_area > 0`)."""
        assert point_inputs is None or mask_inputs is None, "a frame's prompt is points or a mask, not both"
        # The image features (per level: tokens, positions, grid sizes) lead track_step's arguments.
        features = self._get_image_feature(inference_state, frame_idx, batch_size)[2:]
        out = self.track_step(
            frame_idx, is_init_cond_frame, *features, point_inputs, mask_inputs, output_dict,
            inference_state.num_frames, track_in_reverse=reverse, run_mem_encoder=run_mem_encoder,
            prev_sam_mask_logits=prev_sam_mask_logits,
        )  # fmt: skip
        storage = inference_state.storage_device
        maskmem_features = out["maskmem_features"]
        if maskmem_features is not None:
            maskmem_features = maskmem_features.to(self._memory_storage_dtype(maskmem_features))
            maskmem_features = maskmem_features.to(storage, non_blocking=True)
        pred_masks = out["pred_masks"]
        if self.fill_hole_area > 0:
            pred_masks = fill_holes_in_mask_scores(pred_masks, self.fill_hole_area)
        compact = {
            "maskmem_features": maskmem_features,
            "maskmem_pos_enc": self._get_maskmem_pos_enc(inference_state, out["maskmem_pos_enc"]),
            "pred_masks": pred_masks.to(storage, non_blocking=True),
            # pointers are tiny and read on every frame: they stay on the compute device
            "obj_ptr": out["obj_ptr"],
            "object_score_logits": out["object_score_logits"],
        }
        return compact, pred_masks

    def _run_memory_encoder(
        self,
        inference_state: InferenceState,
        frame_idx: int,
        batch_size: int,
        high_res_masks: Tensor,
        object_score_logits: Tensor,
        is_mask_from_pts: bool,
    ) -> tuple[Tensor, list[Tensor]]:
        """Memory of a frame from given mask logits `[B, 1, S, S]`, ready for storage."""
        _, _, vision_feats, _, feat_sizes = self._get_image_feature(inference_state, frame_idx, batch_size)
        maskmem_features, maskmem_pos_enc = self._encode_new_memory(
            current_vision_feats=vision_feats,
            feat_sizes=feat_sizes,
            pred_masks_high_res=high_res_masks,
            object_score_logits=object_score_logits,
            is_mask_from_pts=is_mask_from_pts,
        )
        maskmem_features = maskmem_features.to(self._memory_storage_dtype(maskmem_features))
        maskmem_features = maskmem_features.to(inference_state.storage_device, non_blocking=True)
        return maskmem_features, self._get_maskmem_pos_enc(inference_state, maskmem_pos_enc)

    def _get_maskmem_pos_enc(
        self, inference_state: InferenceState, maskmem_pos_enc: list[Tensor] | None
    ) -> list[Tensor] | None:
        """The memory position encoding is the same on every frame and object: keep one copy in
        the session and hand out views expanded to the batch."""
        if maskmem_pos_enc is None:
            return None
        cached = inference_state.constants.get("maskmem_pos_enc")
        if cached is None:
            cached = [pos[0:1].clone() for pos in maskmem_pos_enc]
            inference_state.constants["maskmem_pos_enc"] = cached
        batch_size = maskmem_pos_enc[0].size(0)
        return [pos.expand(batch_size, -1, -1, -1) for pos in cached]

    def _consolidate_temp_output_across_obj(
        self,
        inference_state: InferenceState,
        frame_idx: int,
        is_cond: bool,
        consolidate_at_video_res: bool = False,
    ) -> Tensor:
        """All objects' newest masks on a frame, `[num_objects, 1, h, w]` logits.

        At video resolution when asked, else at the model's low resolution (`image_size / 4`);
        objects without any output on the frame get `NO_OBJ_SCORE`.
        """
        if consolidate_at_video_res:
            size = (inference_state.video_height, inference_state.video_width)
        else:
            size = (self.image_size // 4, self.image_size // 4)
        masks = torch.full(
            (inference_state.num_objects, 1, *size),
            NO_OBJ_SCORE,
            dtype=torch.float32,
            device=inference_state.storage_device,
        )
        for obj_idx, obj in enumerate(inference_state.objects):
            out = obj.latest_output(frame_idx, pending_key=storage_key(is_cond))
            if out is None:
                continue
            obj_mask = out["pred_masks"]
            if obj_mask.shape[-2:] != size:
                obj_mask = F.interpolate(obj_mask, size=size, mode="bilinear", align_corners=False)
            masks[obj_idx : obj_idx + 1] = obj_mask
        return masks

    def _get_orig_video_res_output(
        self, inference_state: InferenceState, any_res_masks: Tensor
    ) -> tuple[Tensor, Tensor]:
        """`(masks on the compute device, masks [N, 1, H, W] at video resolution)`, the latter
        without overlaps between objects when `non_overlap_masks` is set."""
        any_res_masks = any_res_masks.to(inference_state.device, non_blocking=True)
        video_hw = (inference_state.video_height, inference_state.video_width)
        video_res_masks = any_res_masks
        if any_res_masks.shape[-2:] != video_hw:
            video_res_masks = F.interpolate(any_res_masks, size=video_hw, mode="bilinear", align_corners=False)
        if self.non_overlap_masks:
            video_res_masks = self._apply_non_overlapping_constraints(video_res_masks)
        return any_res_masks, video_res_masks
