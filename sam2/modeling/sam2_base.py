"""SAM2Base: SAM 2's frame-by-frame tracker with a memory bank.

One step (`track_step`) segments the objects of one frame: the frame's features attend to the
memory of earlier frames (memory attention), the SAM heads decode masks from the result and any
prompts, and the memory encoder turns the new mask into that frame's memory. The pieces live in
`sam2.modeling.tracking`: which frames are remembered (`memory_bank`), object pointers
(`object_pointers`), the SAM heads (`sam_heads`) and memory writing (`memory_encoding`). This
class owns the parameters (their names are the checkpoint format) and keeps the official method
names and signatures, which the predictors and the trainer call and override; the per-frame step
itself (`track_step`) comes from `tracking.frame_step.TrackStepMixin`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from sam2.modeling.sam2_utils import MLP
from sam2.modeling.tracking import memory_encoding
from sam2.modeling.tracking.frame_step import TrackStepMixin, tokens_to_map
from sam2.modeling.tracking.memory_bank import select_memory_frames, spatial_memory_tokens
from sam2.modeling.tracking.object_pointers import collect_pointers, pointer_tokens
from sam2.modeling.tracking.options import split_keywords
from sam2.modeling.tracking.sam_heads import NO_OBJ_SCORE, SamHeadsMixin, build_mask_decoder, build_prompt_encoder

__all__ = ["NO_OBJ_SCORE", "SAM2Base"]

OutputDict = Mapping[str, Mapping[int, Mapping[str, Any]]]


def _option(group: str, name: str) -> property:
    """Expose an option under its official flat name (predictors and trainers read it so)."""
    return property(
        lambda self: getattr(getattr(self, group), name),
        lambda self, value: setattr(getattr(self, group), name, value),
        doc=f"`{group}.{name}`",
    )


class SAM2Base(TrackStepMixin, SamHeadsMixin, nn.Module):
    """The SAM 2 tracker.

    Args:
        image_encoder: `ImageEncoder`; its `neck.d_model` is the model width `hidden_dim`.
        memory_attention: `MemoryAttention`, conditions a frame's features on the memory.
        memory_encoder: `MemoryEncoder`; its `out_proj` width is the memory width `mem_dim`.
        compile_image_encoder: ask the runner to `torch.compile` the image encoder (recorded
            as `self.compile_image_encoder`; the module itself never compiles).
        **options: the official flat keywords (`num_maskmem`, `image_size`, `backbone_stride`,
            `use_obj_ptrs_in_encoder`, ...). They are sorted at once into `memory_options`,
            `pointer_options`, `score_options`, `multimask_policy` and `head_options`
            (see `sam2.modeling.tracking.options` for each one's meaning and default) and stay
            readable and writable under their flat names.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        memory_attention: nn.Module,
        memory_encoder: nn.Module,
        compile_image_encoder: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        groups = split_keywords(options)
        self.memory_options = groups["memory_options"]
        self.pointer_options = groups["pointer_options"]
        self.score_options = groups["score_options"]
        self.multimask_policy = groups["multimask_policy"]
        self.head_options = groups["head_options"]

        # Registration order follows the official model, so state dicts list keys alike.
        self.image_encoder = image_encoder
        self.num_feature_levels = 3 if self.use_high_res_features_in_sam else 1
        if self.use_obj_ptrs_in_encoder:
            # Brings a mask prompt to stride 4 and to logit scale, so the decoder can make a
            # pointer from it (see `_use_mask_as_output`).
            self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.memory_attention = memory_attention
        self.hidden_dim: int = image_encoder.neck.d_model
        self.memory_encoder = memory_encoder
        out_proj = getattr(memory_encoder, "out_proj", None)
        self.mem_dim: int = out_proj.weight.shape[0] if hasattr(out_proj, "weight") else self.hidden_dim
        self._build_memory_embeddings()
        self._build_sam_heads()

        # Recorded, not acted on: whoever runs the model compiles it from outside (the trainer's
        # `apply_training_optimizations`, the VOS video predictor), so the module stays plain.
        self.compile_image_encoder = compile_image_encoder

    # Flat official names of the grouped options.
    num_maskmem = _option("memory_options", "num_maskmem")
    max_cond_frames_in_attn = _option("memory_options", "max_cond_frames_in_attn")
    memory_temporal_stride_for_eval = _option("memory_options", "memory_temporal_stride_for_eval")
    directly_add_no_mem_embed = _option("memory_options", "directly_add_no_mem_embed")
    sigmoid_scale_for_mem_enc = _option("memory_options", "sigmoid_scale_for_mem_enc")
    sigmoid_bias_for_mem_enc = _option("memory_options", "sigmoid_bias_for_mem_enc")
    binarize_mask_from_pts_for_mem_enc = _option("memory_options", "binarize_mask_from_pts_for_mem_enc")
    non_overlap_masks_for_mem_enc = _option("memory_options", "non_overlap_masks_for_mem_enc")
    use_obj_ptrs_in_encoder = _option("pointer_options", "use_obj_ptrs_in_encoder")
    max_obj_ptrs_in_encoder = _option("pointer_options", "max_obj_ptrs_in_encoder")
    add_tpos_enc_to_obj_ptrs = _option("pointer_options", "add_tpos_enc_to_obj_ptrs")
    proj_tpos_enc_in_obj_ptrs = _option("pointer_options", "proj_tpos_enc_in_obj_ptrs")
    use_signed_tpos_enc_to_obj_ptrs = _option("pointer_options", "use_signed_tpos_enc_to_obj_ptrs")
    only_obj_ptrs_in_the_past_for_eval = _option("pointer_options", "only_obj_ptrs_in_the_past_for_eval")
    use_mlp_for_obj_ptr_proj = _option("pointer_options", "use_mlp_for_obj_ptr_proj")
    pred_obj_scores = _option("score_options", "pred_obj_scores")
    pred_obj_scores_mlp = _option("score_options", "pred_obj_scores_mlp")
    fixed_no_obj_ptr = _option("score_options", "fixed_no_obj_ptr")
    soft_no_obj_ptr = _option("score_options", "soft_no_obj_ptr")
    multimask_output_in_sam = _option("multimask_policy", "multimask_output_in_sam")
    multimask_min_pt_num = _option("multimask_policy", "multimask_min_pt_num")
    multimask_max_pt_num = _option("multimask_policy", "multimask_max_pt_num")
    multimask_output_for_tracking = _option("multimask_policy", "multimask_output_for_tracking")
    use_multimask_token_for_obj_ptr = _option("multimask_policy", "use_multimask_token_for_obj_ptr")
    image_size = _option("head_options", "image_size")
    backbone_stride = _option("head_options", "backbone_stride")
    use_high_res_features_in_sam = _option("head_options", "use_high_res_features_in_sam")
    iou_prediction_use_sigmoid = _option("head_options", "iou_prediction_use_sigmoid")
    use_mask_input_as_output_without_sam = _option("head_options", "use_mask_input_as_output_without_sam")
    sam_mask_decoder_extra_args = _option("head_options", "sam_mask_decoder_extra_args")

    def _build_memory_embeddings(self) -> None:
        """Learned embeddings of the memory: temporal slots, "no memory", "no object"."""
        # One temporal encoding per memory slot; `[num_maskmem, 1, 1, mem_dim]`.
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(self.num_maskmem, 1, 1, self.mem_dim))
        trunc_normal_(self.maskmem_tpos_enc, std=0.02)
        # The single memory token of a first prompted frame, which has no past to attend to.
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        trunc_normal_(self.no_mem_embed, std=0.02)
        trunc_normal_(self.no_mem_pos_enc, std=0.02)
        self.no_obj_ptr: nn.Parameter | None = None
        if self.pred_obj_scores and self.use_obj_ptrs_in_encoder:
            self.no_obj_ptr = nn.Parameter(torch.zeros(1, self.hidden_dim))
            trunc_normal_(self.no_obj_ptr, std=0.02)
        self.no_obj_embed_spatial: nn.Parameter | None = None
        if self.memory_options.no_obj_embed_spatial:
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, self.mem_dim))
            trunc_normal_(self.no_obj_embed_spatial, std=0.02)

    def _build_sam_heads(self) -> None:
        """SAM's prompt encoder and mask decoder, and the object-pointer projections."""
        self.sam_prompt_embed_dim = self.hidden_dim
        self.sam_image_embedding_size = self.image_size // self.backbone_stride
        self.sam_prompt_encoder = build_prompt_encoder(self.hidden_dim, self.head_options)
        self.sam_mask_decoder = build_mask_decoder(
            self.hidden_dim, self.head_options, self.score_options, self.multimask_policy
        )
        if not self.use_obj_ptrs_in_encoder:
            self.obj_ptr_proj: nn.Module = nn.Identity()
        elif self.use_mlp_for_obj_ptr_proj:
            self.obj_ptr_proj = MLP(self.hidden_dim, self.hidden_dim, self.hidden_dim, 3)
        else:
            self.obj_ptr_proj = nn.Linear(self.hidden_dim, self.hidden_dim)
        # A separate projection keeps the pointers' temporal code apart from spatial encodings.
        if self.proj_tpos_enc_in_obj_ptrs:
            self.obj_ptr_tpos_proj: nn.Module = nn.Linear(self.hidden_dim, self.mem_dim)
        else:
            self.obj_ptr_tpos_proj = nn.Identity()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "SAM2Base has no forward: use SAM2VideoPredictor / SAM2ImagePredictor for inference, "
            "SAM2Train for training, or call track_step frame by frame"
        )

    # ---- image features -------------------------------------------------------------------

    def forward_image(self, img_batch: Tensor) -> dict[str, Any]:
        """Backbone features of `[B, 3, image_size, image_size]` images.

        Returns:
            The image encoder's dict (`vision_features`, `vision_pos_enc`, `backbone_fpn`); with
            high-res features on, the two finest FPN levels are already projected by the mask
            decoder's `conv_s0` / `conv_s1`, so repeated clicks do not redo it.
        """
        if self._image_encoder_is_frozen() and not img_batch.requires_grad:
            # Nothing upstream needs a gradient: keep none of the encoder's activations.
            with torch.no_grad():
                backbone_out = self.image_encoder(img_batch)
        else:
            backbone_out = self.image_encoder(img_batch)
        if self.use_high_res_features_in_sam:
            fpn = backbone_out["backbone_fpn"]
            fpn[0] = self.sam_mask_decoder.conv_s0(fpn[0])
            fpn[1] = self.sam_mask_decoder.conv_s1(fpn[1])
        return backbone_out

    def _image_encoder_is_frozen(self) -> bool:
        """True when no image-encoder parameter trains (e.g. `freeze_image_encoder`)."""
        return not any(param.requires_grad for param in self.image_encoder.parameters())

    def _prepare_backbone_features(
        self, backbone_out: dict[str, Any]
    ) -> tuple[dict[str, Any], list[Tensor], list[Tensor], list[tuple[int, int]]]:
        """Flatten the last `num_feature_levels` FPN levels into tokens.

        Returns:
            `(backbone_out (shallow copy), vision_feats, vision_pos_embeds, feat_sizes)`: per level,
            `[H*W, B, C]` features and position encodings, and `(H, W)`; finest level first.
        """
        backbone_out = backbone_out.copy()
        fpn, pos = backbone_out["backbone_fpn"], backbone_out["vision_pos_enc"]
        assert len(fpn) == len(pos) and len(fpn) >= self.num_feature_levels, (len(fpn), len(pos))
        feature_maps = fpn[-self.num_feature_levels :]
        pos_maps = pos[-self.num_feature_levels :]
        feat_sizes = [(p.shape[-2], p.shape[-1]) for p in pos_maps]
        vision_feats = [m.flatten(2).permute(2, 0, 1) for m in feature_maps]
        vision_pos_embeds = [p.flatten(2).permute(2, 0, 1) for p in pos_maps]
        return backbone_out, vision_feats, vision_pos_embeds, feat_sizes

    # ---- memory ---------------------------------------------------------------------------

    def _prepare_memory_conditioned_features(
        self,
        frame_idx: int,
        is_init_cond_frame: bool,
        current_vision_feats: list[Tensor],
        current_vision_pos_embeds: list[Tensor],
        feat_sizes: list[tuple[int, int]],
        output_dict: OutputDict,
        num_frames: int | None,
        track_in_reverse: bool = False,
    ) -> Tensor:
        """The current frame's lowest-resolution features `[B, C, H, W]` after attending to memory."""
        top_feats, size = current_vision_feats[-1], feat_sizes[-1]
        if self.num_maskmem == 0:  # memory off: plain SAM on images
            return tokens_to_map(top_feats, size)
        if is_init_cond_frame:
            if self.directly_add_no_mem_embed:
                return tokens_to_map(top_feats + self.no_mem_embed, size)
            batch = top_feats.size(1)
            # One dummy token, so memory attention never sees an empty memory.
            memory = [self.no_mem_embed.expand(1, batch, self.mem_dim)]
            memory_pos = [self.no_mem_pos_enc.expand(1, batch, self.mem_dim)]
            num_obj_ptr_tokens = 0
        else:
            memory, memory_pos, num_obj_ptr_tokens = self._gather_memory(
                frame_idx,
                output_dict,
                num_frames=num_frames,
                track_in_reverse=track_in_reverse,
                device=top_feats.device,
            )
        fused = self.memory_attention(
            curr=current_vision_feats,
            curr_pos=current_vision_pos_embeds,
            memory=torch.cat(memory, dim=0),
            memory_pos=torch.cat(memory_pos, dim=0),
            num_obj_ptr_tokens=num_obj_ptr_tokens,
        )
        return tokens_to_map(fused, size)

    def _gather_memory(
        self,
        frame_idx: int,
        output_dict: OutputDict,
        *,
        num_frames: int | None,
        track_in_reverse: bool,
        device: torch.device,
    ) -> tuple[list[Tensor], list[Tensor], int]:
        """Memory tokens `[N_i, B, mem_dim]` and encodings for a tracked frame, and how many of
        the last tokens are object pointers (they get no rotary encoding)."""
        selection = select_memory_frames(
            frame_idx,
            output_dict,
            num_maskmem=self.num_maskmem,
            max_cond_frames_in_attn=self.max_cond_frames_in_attn,
            stride=1 if self.training else self.memory_temporal_stride_for_eval,
            track_in_reverse=track_in_reverse,
        )
        memory, memory_pos = spatial_memory_tokens(selection.spatial, self.maskmem_tpos_enc, device=device)
        if not self.use_obj_ptrs_in_encoder:
            return memory, memory_pos, 0
        pointers = collect_pointers(
            frame_idx,
            selection,
            output_dict,
            num_frames=num_frames,
            options=self.pointer_options,
            training=self.training,
            track_in_reverse=track_in_reverse,
        )
        if not pointers:
            return memory, memory_pos, 0
        tokens, positions = pointer_tokens(
            pointers,
            num_frames=num_frames,
            options=self.pointer_options,
            tpos_proj=self.obj_ptr_tpos_proj,
            mem_dim=self.mem_dim,
            device=device,
        )
        return memory + [tokens], memory_pos + [positions], tokens.shape[0]

    def _encode_new_memory(
        self,
        current_vision_feats: list[Tensor],
        feat_sizes: list[tuple[int, int]],
        pred_masks_high_res: Tensor,
        object_score_logits: Tensor,
        is_mask_from_pts: bool,
    ) -> tuple[Tensor, list[Tensor]]:
        """This frame's memory from its features and predicted mask logits `[B, 1, H, W]`.

        Returns:
            `(maskmem_features [B, mem_dim, h, w], maskmem_pos_enc [[B, mem_dim, h, w]])`.
        """
        pix_feat = tokens_to_map(current_vision_feats[-1], feat_sizes[-1])
        mask = memory_encoding.mask_for_memory_encoder(
            pred_masks_high_res, options=self.memory_options, is_mask_from_pts=is_mask_from_pts, training=self.training
        )
        encoded = self.memory_encoder(pix_feat, mask, skip_mask_sigmoid=True)
        maskmem_features, maskmem_pos_enc = encoded["vision_features"], encoded["vision_pos_enc"]
        if self.no_obj_embed_spatial is not None:
            maskmem_features = memory_encoding.add_no_object_embedding(
                maskmem_features, object_score_logits, self.no_obj_embed_spatial
            )
        return maskmem_features, maskmem_pos_enc

    def _apply_non_overlapping_constraints(self, pred_masks: Tensor) -> Tensor:
        """Per pixel, keep only the highest-scoring object of `[N, 1, H, W]` logits."""
        return memory_encoding.apply_non_overlapping_constraints(pred_masks)
