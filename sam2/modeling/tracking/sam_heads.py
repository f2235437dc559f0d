"""The SAM heads of the tracker: prompt encoder + mask decoder on one frame's features.

Building the heads, turning prompts into the decoder's inputs, choosing the best of several
candidate masks and the shortcut that takes a mask prompt as the answer are separate steps here;
`SamHeadsMixin` strings them together under the official method names that `SAM2Base` (and the
predictors and trainer that subclass it) call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from sam2.modeling.sam2_utils import resize
from sam2.modeling.tracking.object_pointers import blend_absent_object_pointer
from sam2.modeling.tracking.options import MultimaskPolicy, ObjectScoreOptions, SamHeadOptions

# Mask logit given to every pixel of an object predicted absent.
NO_OBJ_SCORE = -1024.0

# A mask prompt taken as the answer becomes logits of +-10 (sigmoid(-10) = 4.5e-5).
MASK_AS_OUTPUT_SCALE, MASK_AS_OUTPUT_BIAS = 20.0, -10.0


class SamHeadOutputs(NamedTuple):
    """What the SAM heads return for a batch of B objects on one frame (M candidate masks).

    Unpacks like the official 7-tuple, so subclasses and trainers can unpack by position.
    """

    low_res_multimasks: Tensor  # [B, M, 4h, 4w] logits
    high_res_multimasks: Tensor  # [B, M, image_size, image_size] logits
    ious: Tensor  # [B, M] predicted IoU of each candidate
    low_res_masks: Tensor  # [B, 1, 4h, 4w] the chosen candidate
    high_res_masks: Tensor  # [B, 1, image_size, image_size]
    obj_ptr: Tensor  # [B, C] object pointer
    object_score_logits: Tensor  # [B, 1] > 0 means the object is visible


def build_prompt_encoder(hidden_dim: int, head: SamHeadOptions) -> PromptEncoder:
    """SAM's prompt encoder at the tracker's resolution (`mask_in_chans` as in SAM)."""
    grid = head.image_size // head.backbone_stride
    return PromptEncoder(
        embed_dim=hidden_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(head.image_size, head.image_size),
        mask_in_chans=16,
    )


def build_mask_decoder(
    hidden_dim: int, head: SamHeadOptions, scores: ObjectScoreOptions, multimask: MultimaskPolicy
) -> MaskDecoder:
    """SAM's mask decoder (two-way transformer of depth 2, 3 candidate masks)."""
    extra_args: Mapping[str, Any] = head.sam_mask_decoder_extra_args or {}
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=hidden_dim, mlp_dim=2048, num_heads=8),
        transformer_dim=hidden_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        use_high_res_features=head.use_high_res_features_in_sam,
        iou_prediction_use_sigmoid=head.iou_prediction_use_sigmoid,
        pred_obj_scores=scores.pred_obj_scores,
        pred_obj_scores_mlp=scores.pred_obj_scores_mlp,
        use_multimask_token_for_obj_ptr=multimask.use_multimask_token_for_obj_ptr,
        **extra_args,
    )


def point_prompt(
    point_inputs: Mapping[str, Tensor] | None, *, batch: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """`(coords [B, P, 2] pixels xy, labels [B, P] int32)`; one padding point when there are none."""
    if point_inputs is None:
        # The decoder needs at least one sparse token; label -1 marks it as padding.
        coords = torch.zeros(batch, 1, 2, device=device)
        labels = -torch.ones(batch, 1, dtype=torch.int32, device=device)
        return coords, labels
    coords, labels = point_inputs["point_coords"], point_inputs["point_labels"]
    if coords.size(0) != batch or labels.size(0) != batch:
        raise ValueError(
            f"point prompts are for {coords.size(0)} objects (labels {labels.size(0)}) but the "
            f"features are for {batch}; give one row of points per object"
        )
    return coords, labels


def dense_mask_prompt(mask_inputs: Tensor | None, *, batch: int, mask_input_size: tuple[int, int]) -> Tensor | None:
    """A mask prompt `[B, 1, H, W]` (any size, float or bool) at the prompt encoder's size."""
    if mask_inputs is None:
        return None
    if mask_inputs.dim() != 4 or tuple(mask_inputs.shape[:2]) != (batch, 1):
        raise ValueError(f"mask prompt must be [{batch}, 1, H, W], got {list(mask_inputs.shape)}")
    if tuple(mask_inputs.shape[-2:]) == tuple(mask_input_size):
        return mask_inputs
    return F.interpolate(
        mask_inputs.float(), size=mask_input_size, mode="bilinear", align_corners=False, antialias=True
    )


def pick_best_candidate(
    low_res_multimasks: Tensor, high_res_multimasks: Tensor, ious: Tensor, output_tokens: Tensor, multimask_output: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The candidate with the highest predicted IoU and the output token to make its pointer from.

    Args:
        low_res_multimasks: `[B, M, h, w]`; high_res_multimasks: `[B, M, H, W]`; ious: `[B, M]`.
        output_tokens: `[B, T, C]` mask tokens from the decoder; T = M when the decoder keeps one
            token per candidate for pointers, else 1.

    Returns:
        `(low_res_mask [B, 1, h, w], high_res_mask [B, 1, H, W], token [B, C])`.
    """
    if not multimask_output:
        return low_res_multimasks, high_res_multimasks, output_tokens[:, 0]
    best = torch.argmax(ious, dim=-1)
    rows = torch.arange(ious.size(0), device=ious.device)
    token = output_tokens[rows, best] if output_tokens.size(1) > 1 else output_tokens[:, 0]
    return low_res_multimasks[rows, best].unsqueeze(1), high_res_multimasks[rows, best].unsqueeze(1), token


def mask_prompt_as_logits(mask_inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Turn a binary mask prompt into confident logits, as if SAM had predicted it.

    Args:
        mask_inputs: `[B, 1, H, W]` at image resolution, float or bool.

    Returns:
        `(low_res [B, 1, H/4, W/4], high_res [B, 1, H, W], ious [B, 1] all ones,
        visibility [B, 1])`; visibility is 1 where the mask has any foreground pixel.
    """
    high_res = mask_inputs.float() * MASK_AS_OUTPUT_SCALE + MASK_AS_OUTPUT_BIAS
    low_res = F.interpolate(
        high_res,
        size=(high_res.size(-2) // 4, high_res.size(-1) // 4),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    ious = mask_inputs.new_ones(mask_inputs.size(0), 1).float()
    # The prompt itself, not the decoder's object score, says whether the object is there.
    visibility = (mask_inputs.flatten(1).float() > 0.0).any(dim=1, keepdim=True).float()
    return low_res, high_res, ious, visibility


class SamHeadsMixin:
    """The SAM-head steps of `SAM2Base`, under their official method names.

    The host module provides `sam_prompt_encoder`, `sam_mask_decoder`, `obj_ptr_proj`,
    `mask_downsample`, `no_obj_ptr` and the option attributes read below.
    """

    sam_prompt_encoder: PromptEncoder
    sam_mask_decoder: MaskDecoder
    obj_ptr_proj: nn.Module
    no_obj_ptr: nn.Parameter | None

    def _forward_sam_heads(
        self,
        backbone_features: Tensor,
        point_inputs: Mapping[str, Tensor] | None = None,
        mask_inputs: Tensor | None = None,
        high_res_features: list[Tensor] | None = None,
        multimask_output: bool = False,
    ) -> SamHeadOutputs:
        """Decode masks for B objects on one frame.

        Args:
            backbone_features: `[B, C, h, w]` (memory-conditioned) features, `h = w =
                image_size // backbone_stride`.
            point_inputs: `{"point_coords": [B, P, 2] pixels xy, "point_labels": [B, P] int32}`
                (1 positive, 0 negative, 2/3 box corners, -1 padding), or None.
            mask_inputs: `[B, 1, H, W]` mask prompt (logits or binary), resized as needed.
            high_res_features: `[[B, C/8, 4h, 4w], [B, C/4, 2h, 2w]]` or None.
            multimask_output: decode 3 candidates and keep the one with the best IoU estimate.
        """
        batch, channels, height, width = backbone_features.shape
        grid = self.sam_image_embedding_size
        if (channels, height, width) != (self.sam_prompt_embed_dim, grid, grid):
            raise ValueError(
                f"SAM heads expect features [B, {self.sam_prompt_embed_dim}, {grid}, {grid}] "
                f"(image_size {self.image_size} / stride {self.backbone_stride}), got "
                f"{list(backbone_features.shape)}"
            )
        points = point_prompt(point_inputs, batch=batch, device=backbone_features.device)
        mask_prompt = dense_mask_prompt(
            mask_inputs, batch=batch, mask_input_size=self.sam_prompt_encoder.mask_input_size
        )
        sparse, dense = self.sam_prompt_encoder(points=points, boxes=None, masks=mask_prompt)
        low_res_multimasks, ious, output_tokens, object_score_logits = self.sam_mask_decoder(
            image_embeddings=backbone_features,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=False,  # features are already one row per object
            high_res_features=high_res_features,
        )
        if self.pred_obj_scores:
            visible = object_score_logits > 0
            # Masks (and so memories) of absent objects are empty, a hard choice.
            low_res_multimasks = torch.where(visible[:, None, None], low_res_multimasks, NO_OBJ_SCORE)
        low_res_multimasks = low_res_multimasks.float()  # from bf16/fp16 under autocast
        high_res_multimasks = resize(low_res_multimasks, (self.image_size, self.image_size), mode="bilinear")
        low_res_masks, high_res_masks, token = pick_best_candidate(
            low_res_multimasks, high_res_multimasks, ious, output_tokens, multimask_output
        )
        obj_ptr = self.obj_ptr_proj(token)
        if self.pred_obj_scores and self.no_obj_ptr is not None:
            # Pointers may blend softly, unlike masks, to make recovery from mistakes easier.
            visibility = object_score_logits.sigmoid() if self.soft_no_obj_ptr else visible.float()
            obj_ptr = blend_absent_object_pointer(
                obj_ptr, visibility, self.no_obj_ptr, fixed_no_obj_ptr=self.fixed_no_obj_ptr
            )
        return SamHeadOutputs(
            low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits
        )

    def _use_mask_as_output(
        self, backbone_features: Tensor, high_res_features: list[Tensor] | None, mask_inputs: Tensor
    ) -> SamHeadOutputs:
        """Take a binary mask prompt `[B, 1, H, W]` as the prediction (outputs as `_forward_sam_heads`)."""
        low_res, high_res, ious, visibility = mask_prompt_as_logits(mask_inputs)
        if self.use_obj_ptrs_in_encoder:
            # The pointer still comes from the decoder, prompted with the (downsampled) mask.
            decoded = SamHeadOutputs(
                *self._forward_sam_heads(
                    backbone_features=backbone_features,
                    mask_inputs=self.mask_downsample(mask_inputs.float()),
                    high_res_features=high_res_features,
                )
            )
            obj_ptr = decoded.obj_ptr
        else:
            obj_ptr = torch.zeros(mask_inputs.size(0), self.hidden_dim, device=mask_inputs.device)
        object_score_logits = MASK_AS_OUTPUT_SCALE * visibility + MASK_AS_OUTPUT_BIAS
        if self.pred_obj_scores and self.no_obj_ptr is not None:
            obj_ptr = blend_absent_object_pointer(
                obj_ptr, visibility, self.no_obj_ptr, fixed_no_obj_ptr=self.fixed_no_obj_ptr
            )
        return SamHeadOutputs(low_res, high_res, ious, low_res, high_res, obj_ptr, object_score_logits)

    def _use_multimask(self, is_init_cond_frame: bool, point_inputs: Mapping[str, Tensor] | None) -> bool:
        """Whether the SAM head should return 3 candidate masks for this prompt."""
        num_points = 0 if point_inputs is None else point_inputs["point_labels"].size(1)
        return self.multimask_policy.wants_multimask(is_init_cond_frame=is_init_cond_frame, num_points=num_points)
