"""The tracker's settings, grouped by what they control.

`SAM2Base` takes the official flat keywords (configs and checkpoints name them) and sorts them at
once into these groups, so each piece of the tracker receives only the settings it reads. Field
names are the official keyword names, which keeps the mapping one-to-one and greppable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class MemoryOptions:
    """Which past frames are remembered and how a predicted mask is written into memory.

    Attributes:
        num_maskmem: memory slots: one for the prompted (conditioning) frames plus
            `num_maskmem - 1` recent tracked frames. 0 turns memory off (SAM on single images).
        max_cond_frames_in_attn: keep only this many prompted frames, the closest in time
            (-1: all of them).
        memory_temporal_stride_for_eval: in eval, take the older recent frames every r-th frame
            (the most recent frame is always taken).
        directly_add_no_mem_embed: on a first prompted frame, add `no_mem_embed` to the features
            instead of running memory attention over a dummy memory token.
        sigmoid_scale_for_mem_enc, sigmoid_bias_for_mem_enc: the mask enters the memory encoder as
            `sigmoid(logits) * scale + bias`.
        binarize_mask_from_pts_for_mem_enc: in eval, a mask predicted from clicks is thresholded
            at 0 before encoding, so memory holds exactly what the user saw.
        non_overlap_masks_for_mem_enc: in eval, each pixel keeps only the best-scoring object.
        no_obj_embed_spatial: add a learned embedding to the memory of frames where the object
            is predicted absent.
    """

    num_maskmem: int = 7
    max_cond_frames_in_attn: int = -1
    memory_temporal_stride_for_eval: int = 1
    directly_add_no_mem_embed: bool = False
    sigmoid_scale_for_mem_enc: float = 1.0
    sigmoid_bias_for_mem_enc: float = 0.0
    binarize_mask_from_pts_for_mem_enc: bool = False
    non_overlap_masks_for_mem_enc: bool = False
    no_obj_embed_spatial: bool = False


@dataclass
class ObjectPointerOptions:
    """Object pointers: one token per frame, taken from the SAM output token, added to memory.

    Attributes:
        use_obj_ptrs_in_encoder: turns pointers on; everything below matters only then.
        max_obj_ptrs_in_encoder: at most this many pointers (also capped by the clip length).
        add_tpos_enc_to_obj_ptrs: give each pointer a sine encoding of its distance in time.
        proj_tpos_enc_in_obj_ptrs: pass that encoding through a learned linear layer.
        use_signed_tpos_enc_to_obj_ptrs: signed distance (past vs future) instead of absolute.
        only_obj_ptrs_in_the_past_for_eval: in eval, ignore prompted frames that lie ahead.
        use_mlp_for_obj_ptr_proj: a 3-layer MLP instead of one linear layer makes the pointer.
    """

    use_obj_ptrs_in_encoder: bool = False
    max_obj_ptrs_in_encoder: int = 16
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = False
    use_signed_tpos_enc_to_obj_ptrs: bool = False
    only_obj_ptrs_in_the_past_for_eval: bool = False
    use_mlp_for_obj_ptr_proj: bool = False


@dataclass
class ObjectScoreOptions:
    """Occlusion handling: a per-frame score says whether the object is visible.

    Attributes:
        pred_obj_scores: the mask decoder predicts the score; absent objects get empty masks.
        pred_obj_scores_mlp: predict it with an MLP rather than one linear layer.
        fixed_no_obj_ptr: an absent object's pointer is replaced by `no_obj_ptr` (otherwise
            `no_obj_ptr` is added to it).
        soft_no_obj_ptr: blend by the score's sigmoid instead of a hard visible/absent choice.
    """

    pred_obj_scores: bool = False
    pred_obj_scores_mlp: bool = False
    fixed_no_obj_ptr: bool = False
    soft_no_obj_ptr: bool = False


@dataclass
class MultimaskPolicy:
    """When the SAM head returns three candidate masks (and keeps the best) instead of one.

    Attributes:
        multimask_output_in_sam: allow multimask output at all.
        multimask_min_pt_num, multimask_max_pt_num: only with this many prompt points (a box
            counts as two).
        multimask_output_for_tracking: also on frames that are not first prompted frames.
        use_multimask_token_for_obj_ptr: the pointer comes from the chosen mask's token.
    """

    multimask_output_in_sam: bool = False
    multimask_min_pt_num: int = 1
    multimask_max_pt_num: int = 1
    multimask_output_for_tracking: bool = False
    use_multimask_token_for_obj_ptr: bool = False

    def wants_multimask(self, *, is_init_cond_frame: bool, num_points: int) -> bool:
        """Whether a frame prompted with `num_points` points gets three candidate masks."""
        return (
            self.multimask_output_in_sam
            and (is_init_cond_frame or self.multimask_output_for_tracking)
            and self.multimask_min_pt_num <= num_points <= self.multimask_max_pt_num
        )


@dataclass
class SamHeadOptions:
    """The SAM prompt encoder and mask decoder that segment each frame.

    Attributes:
        image_size: side of the square model input, in pixels.
        backbone_stride: image pixels per cell of the lowest-resolution feature map.
        use_high_res_features_in_sam: feed the stride-4 and stride-8 maps to the mask decoder.
        iou_prediction_use_sigmoid: squash IoU predictions into [0, 1].
        use_mask_input_as_output_without_sam: a mask prompt is taken as the answer as is.
        sam_mask_decoder_extra_args: further `MaskDecoder` keywords (e.g. dynamic multimask).
    """

    image_size: int = 512
    backbone_stride: int = 16
    use_high_res_features_in_sam: bool = False
    iou_prediction_use_sigmoid: bool = False
    use_mask_input_as_output_without_sam: bool = False
    sam_mask_decoder_extra_args: Mapping[str, Any] | None = None


OPTION_GROUPS: dict[str, type] = {
    "memory_options": MemoryOptions,
    "pointer_options": ObjectPointerOptions,
    "score_options": ObjectScoreOptions,
    "multimask_policy": MultimaskPolicy,
    "head_options": SamHeadOptions,
}


def field_owners() -> dict[str, str]:
    """Official keyword -> the attribute name of the group that holds it."""
    return {f.name: group for group, cls in OPTION_GROUPS.items() for f in fields(cls)}


def split_keywords(keywords: Mapping[str, Any]) -> dict[str, Any]:
    """Sort the official flat keywords into one instance of each option group.

    Raises:
        TypeError: for a keyword no group knows (usually a typo in a config).
        ValueError: for settings that only work together but were given apart.
    """
    owners = field_owners()
    unknown = sorted(set(keywords) - set(owners))
    if unknown:
        raise TypeError(f"SAM2Base got unknown keyword(s) {unknown}; the known ones are {sorted(owners)}")
    per_group: dict[str, dict[str, Any]] = {group: {} for group in OPTION_GROUPS}
    for name, value in keywords.items():
        per_group[owners[name]][name] = value
    groups = {group: OPTION_GROUPS[group](**values) for group, values in per_group.items()}
    _check_consistency(groups["pointer_options"], groups["score_options"])
    return groups


def _check_consistency(pointers: ObjectPointerOptions, scores: ObjectScoreOptions) -> None:
    if pointers.proj_tpos_enc_in_obj_ptrs and not pointers.add_tpos_enc_to_obj_ptrs:
        raise ValueError(
            "proj_tpos_enc_in_obj_ptrs=True projects the pointers' temporal encoding, which needs "
            "add_tpos_enc_to_obj_ptrs=True; set both or neither"
        )
    if scores.fixed_no_obj_ptr and not (scores.pred_obj_scores and pointers.use_obj_ptrs_in_encoder):
        raise ValueError(
            "fixed_no_obj_ptr=True replaces the pointer of an absent object, which needs "
            f"pred_obj_scores=True and use_obj_ptrs_in_encoder=True (got pred_obj_scores="
            f"{scores.pred_obj_scores}, use_obj_ptrs_in_encoder={pointers.use_obj_ptrs_in_encoder})"
        )
