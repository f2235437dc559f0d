"""One tracking step: segment the objects of one frame and write the result into memory.

`TrackStepMixin` gives `SAM2Base` the official `_track_step` / `_encode_memory_in_output` /
`track_step` trio. Trainers override `track_step` and reuse the other two (for example to add
correction clicks between decoding and memory encoding), so their signatures and return values
are kept exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from sam2.modeling.tracking.sam_heads import SamHeadOutputs

OutputDict = Mapping[str, Mapping[int, Mapping[str, Any]]]


def tokens_to_map(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """`[H*W, B, C]` tokens -> `[B, C, H, W]` feature map."""
    return tokens.permute(1, 2, 0).view(tokens.size(1), tokens.size(2), *size)


class TrackStepMixin:
    """The per-frame step of `SAM2Base`; the host provides the memory and SAM-head methods."""

    def _track_step(
        self,
        frame_idx: int,
        is_init_cond_frame: bool,
        current_vision_feats: list[Tensor],
        current_vision_pos_embeds: list[Tensor],
        feat_sizes: list[tuple[int, int]],
        point_inputs: Mapping[str, Tensor] | None,
        mask_inputs: Tensor | None,
        output_dict: OutputDict,
        num_frames: int | None,
        track_in_reverse: bool,
        prev_sam_mask_logits: Tensor | None,
    ) -> tuple[dict[str, Any], SamHeadOutputs, list[Tensor] | None, Tensor]:
        """Decode this frame's masks, conditioned on memory unless a mask prompt is the answer.

        Returns:
            `(current_out, sam_outputs, high_res_features, pix_feat)`: the frame's output dict so
            far (its prompts), the SAM heads' outputs, the finer feature maps given to the mask
            decoder (or None), and the `[B, C, h, w]` features the heads decoded from.
        """
        current_out: dict[str, Any] = {"point_inputs": point_inputs, "mask_inputs": mask_inputs}
        high_res_features = None
        if len(current_vision_feats) > 1:
            high_res_features = [tokens_to_map(x, size) for x, size in zip(current_vision_feats[:-1], feat_sizes[:-1])]
        if mask_inputs is not None and self.use_mask_input_as_output_without_sam:
            # A mask prompt is taken as ground truth: no memory, no decoding of the mask itself.
            pix_feat = tokens_to_map(current_vision_feats[-1], feat_sizes[-1])
            sam_outputs = self._use_mask_as_output(pix_feat, high_res_features, mask_inputs)
            return current_out, sam_outputs, high_res_features, pix_feat

        # Memory attention sees the coarsest level only (positional: the official signature's order).
        coarsest = slice(-1, None)
        pix_feat = self._prepare_memory_conditioned_features(
            frame_idx, is_init_cond_frame, current_vision_feats[coarsest], current_vision_pos_embeds[coarsest],
            feat_sizes[coarsest], output_dict, num_frames, track_in_reverse,
        )  # fmt: skip
        if prev_sam_mask_logits is not None:
            # Correction clicks: the earlier prediction goes back in as a dense prompt.
            if point_inputs is None or mask_inputs is not None:
                raise ValueError(
                    "prev_sam_mask_logits (the mask logits being corrected) go with new clicks: pass "
                    "point_inputs and no mask_inputs"
                )
            mask_inputs = prev_sam_mask_logits
        sam_outputs = self._forward_sam_heads(
            backbone_features=pix_feat,
            point_inputs=point_inputs,
            mask_inputs=mask_inputs,
            high_res_features=high_res_features,
            multimask_output=self._use_multimask(is_init_cond_frame, point_inputs),
        )
        return current_out, sam_outputs, high_res_features, pix_feat

    def _encode_memory_in_output(
        self,
        current_vision_feats: list[Tensor],
        feat_sizes: list[tuple[int, int]],
        point_inputs: Mapping[str, Tensor] | None,
        run_mem_encoder: bool,
        high_res_masks: Tensor,
        object_score_logits: Tensor,
        current_out: dict[str, Any],
    ) -> None:
        """Store this frame's memory (`maskmem_features`, `maskmem_pos_enc`) in `current_out`;
        None for both when the memory encoder is skipped or memory is off."""
        if not (run_mem_encoder and self.num_maskmem > 0):
            current_out["maskmem_features"] = None
            current_out["maskmem_pos_enc"] = None
            return
        maskmem_features, maskmem_pos_enc = self._encode_new_memory(
            current_vision_feats=current_vision_feats,
            feat_sizes=feat_sizes,
            pred_masks_high_res=high_res_masks,
            object_score_logits=object_score_logits,
            is_mask_from_pts=point_inputs is not None,
        )
        current_out["maskmem_features"] = maskmem_features
        current_out["maskmem_pos_enc"] = maskmem_pos_enc

    def track_step(
        self,
        frame_idx: int,
        is_init_cond_frame: bool,
        current_vision_feats: list[Tensor],
        current_vision_pos_embeds: list[Tensor],
        feat_sizes: list[tuple[int, int]],
        point_inputs: Mapping[str, Tensor] | None,
        mask_inputs: Tensor | None,
        output_dict: OutputDict,
        num_frames: int | None,
        track_in_reverse: bool = False,
        run_mem_encoder: bool = True,
        prev_sam_mask_logits: Tensor | None = None,
    ) -> dict[str, Any]:
        """Segment B objects on frame `frame_idx` and encode the result into memory.

        Args:
            frame_idx: index of this frame in the clip.
            is_init_cond_frame: a prompted frame with no memory to attend to yet.
            current_vision_feats, current_vision_pos_embeds, feat_sizes: from
                `_prepare_backbone_features`: per level `[H*W, B, C]` tokens and `(H, W)`.
            point_inputs: `{"point_coords": [B, P, 2], "point_labels": [B, P]}` or None.
            mask_inputs: `[B, 1, image_size, image_size]` mask prompt or None.
            output_dict: `{"cond_frame_outputs": {t: out}, "non_cond_frame_outputs": {t: out}}`
                of the frames processed so far (the memory bank).
            num_frames: clip length (caps how far back object pointers are taken).
            track_in_reverse: the clip is processed from its end to its start.
            run_mem_encoder: also encode this frame's memory (skip while clicks are pending).
            prev_sam_mask_logits: `[B, 1, 4h, 4w]` logits being corrected with new clicks.

        Returns:
            `{"point_inputs", "mask_inputs", "pred_masks" [B, 1, 4h, 4w], "pred_masks_high_res"
            [B, 1, image_size, image_size], "obj_ptr" [B, C], "object_score_logits" [B, 1] (eval
            only), "maskmem_features" [B, mem_dim, h, w] | None, "maskmem_pos_enc" [[...]] | None}`.
        """
        frame_args = dict(
            frame_idx=frame_idx, is_init_cond_frame=is_init_cond_frame, current_vision_feats=current_vision_feats,
            current_vision_pos_embeds=current_vision_pos_embeds, feat_sizes=feat_sizes, point_inputs=point_inputs,
            mask_inputs=mask_inputs, output_dict=output_dict, num_frames=num_frames,
        )
        current_out, sam_outputs, _, _ = self._track_step(
            **frame_args, track_in_reverse=track_in_reverse, prev_sam_mask_logits=prev_sam_mask_logits
        )
        outputs = SamHeadOutputs(*sam_outputs)
        current_out.update(
            pred_masks=outputs.low_res_masks, pred_masks_high_res=outputs.high_res_masks, obj_ptr=outputs.obj_ptr
        )
        if not self.training:
            # Eval only: in training an output nobody uses would trip activation checkpointing.
            current_out["object_score_logits"] = outputs.object_score_logits
        self._encode_memory_in_output(
            current_vision_feats=current_vision_feats,
            feat_sizes=feat_sizes,
            point_inputs=point_inputs,
            run_mem_encoder=run_mem_encoder,
            high_res_masks=outputs.high_res_masks,
            object_score_logits=outputs.object_score_logits,
            current_out=current_out,
        )
        return current_out
