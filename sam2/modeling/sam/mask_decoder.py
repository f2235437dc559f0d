"""SAM 2's mask decoder: output tokens read the image through a two-way transformer and become masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sam2.modeling.sam2_utils import MLP, LayerNorm2d

# Logit reported for "object present" when the decoder has no object-score head (sigmoid(10) ~ 1).
OBJECT_PRESENT_LOGIT = 10.0


@dataclass(frozen=True)
class StabilityFallback:
    """When one mask is asked for, fall back to the best multimask output if the single mask is unstable.

    Stability is the IoU of the mask thresholded at `+delta` and at `-delta` logits; the single
    mask is kept when its stability is at least `thresh`. Only applied in eval mode.
    """

    delta: float = 0.05
    thresh: float = 0.98


class MaskDecoder(nn.Module):
    """Predicts masks, their IoU and (optionally) an object score from image and prompt embeddings.

    Output tokens, in order: the object-score token (if `pred_obj_scores`), the IoU token and
    `num_multimask_outputs + 1` mask tokens (token 0 for the single-mask answer, the rest for the
    ambiguity-aware multimask answer). They are prepended to the prompt tokens and run through
    `transformer` with the image embedding; each mask token then weights, through its own MLP, the
    channels of the upscaled image embedding.

    Args:
        transformer_dim: channel width `C` of tokens and image embedding.
        transformer: a `TwoWayTransformer` of width `C`.
        activation: activation class of the upscaling stack.
        use_high_res_features: add stride-4/8 backbone features (via `conv_s0`/`conv_s1`) while upscaling.
        num_multimask_outputs: masks in the multimask answer.
        iou_head_depth, iou_head_hidden_dim: layers and width of the IoU head MLP.
        iou_prediction_use_sigmoid: IoU head ends with a sigmoid.
        pred_obj_scores: predict an "object present" logit from its own token.
        pred_obj_scores_mlp: the object-score head is a 3-layer MLP instead of a linear layer.
        dynamic_multimask_via_stability, dynamic_multimask_stability_delta,
        dynamic_multimask_stability_thresh: see `StabilityFallback`.
        use_multimask_token_for_obj_ptr: with multimask output, return the multimask tokens as SAM
            tokens (for object pointers) instead of the single-mask token.
    """

    def __init__(
        self,
        *,
        # The trunk: token width, the two-way transformer, and the upscaling back to masks.
        transformer_dim: int,
        transformer: nn.Module,
        activation: type[nn.Module] = nn.GELU,
        use_high_res_features: bool = False,
        # Heads on the output tokens.
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3, iou_head_hidden_dim: int = 256, iou_prediction_use_sigmoid: bool = False,
        pred_obj_scores: bool = False, pred_obj_scores_mlp: bool = False,
        # Which answer is returned.
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05, dynamic_multimask_stability_thresh: float = 0.98,
        use_multimask_token_for_obj_ptr: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.pred_obj_scores = pred_obj_scores
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.use_high_res_features = use_high_res_features
        self.stability_fallback = (
            StabilityFallback(dynamic_multimask_stability_delta, dynamic_multimask_stability_thresh)
            if dynamic_multimask_via_stability
            else None
        )

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)

        # Two 2x transposed convolutions, C -> C/4 -> C/8 channels (the first one normalised).
        quarter, eighth = transformer_dim // 4, transformer_dim // 8
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, quarter, kernel_size=2, stride=2), LayerNorm2d(quarter), activation(),
            nn.ConvTranspose2d(quarter, eighth, kernel_size=2, stride=2), activation(),
        )  # fmt: skip
        if use_high_res_features:
            # Applied by the tracker to the backbone's stride-4 (s0) and stride-8 (s1) features.
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1, stride=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1, stride=1)

        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
        )
        if pred_obj_scores:
            self.pred_obj_score_head = (
                MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp else nn.Linear(transformer_dim, 1)
            )

    @property
    def dynamic_multimask_via_stability(self) -> bool:
        return self.stability_fallback is not None

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Predict masks for a batch of prompts.

        Args:
            image_embeddings: `[B_img, C, H, W]`; `B_img` is 1 with `repeat_image`, else `B`.
            image_pe: `[1, C, H, W]` from `PromptEncoder.get_dense_pe()`.
            sparse_prompt_embeddings: `[B, N, C]` point and box tokens.
            dense_prompt_embeddings: `[B, C, H, W]` mask-prompt embedding.
            multimask_output: return the `num_multimask_outputs` ambiguity-aware masks instead of one.
            repeat_image: share one image embedding across all `B` prompts.
            high_res_features: `[B, C/8, 4H, 4W]` and `[B, C/4, 2H, 2W]` features, already through
                `conv_s0`/`conv_s1`; required when `use_high_res_features`.

        Returns:
            masks `[B, M, 4H, 4W]` (logits; M = num_multimask_outputs or 1), iou_pred `[B, M]`,
            sam_tokens_out `[B, M', C]` (mask tokens for object pointers) and object_score_logits `[B, 1]`.
        """
        prompts = (sparse_prompt_embeddings, dense_prompt_embeddings)
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings, image_pe, *prompts, repeat_image, high_res_features
        )
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.stability_fallback is not None and not self.training:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]

        # Training always tracks after several clicks, i.e. from the single-mask token, so that
        # token stays the object pointer even when multimask output is asked for at test time.
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def _output_tokens(self, batch_size: int) -> Tensor:
        """`[B, T, C]` learned output tokens: [object score,] IoU, mask tokens."""
        weights = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            weights.insert(0, self.obj_score_token.weight)
        return torch.cat(weights, dim=0).unsqueeze(0).expand(batch_size, -1, -1)

    def _upscale(self, image_tokens: Tensor, high_res_features: list[Tensor] | None) -> Tensor:
        """`[B, C, H, W]` transformer output -> `[B, C/8, 4H, 4W]`, mixing in high-res features if used."""
        if not self.use_high_res_features:
            return self.output_upscaling(image_tokens)
        if high_res_features is None:
            raise ValueError(
                "this MaskDecoder has use_high_res_features=True: pass high_res_features=[feat_s0, feat_s1]"
            )
        upconv1, norm1, act1, upconv2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        upscaled = act1(norm1(upconv1(image_tokens) + feat_s1))
        # The high-res features come channels-last from the trunk, and so would the sum. The masks'
        # matmul reads it contiguous (flattening copies it anyway), so copy before the activation:
        # its backward then meets a gradient of its own layout (in a training step on the CPU,
        # 0.45 instead of 2.4-3.5 ms per call at [2, 32, 64, 64]). Same values.
        return act2((upconv2(upscaled) + feat_s0).contiguous())

    def predict_masks(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        repeat_image: bool,
        high_res_features: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """All `num_mask_tokens` masks `[B, T, 4H, 4W]`, IoUs `[B, T]`, mask tokens `[B, T, C]` and
        object-score logits `[B, 1]`; see `forward` for the arguments."""
        batch_size = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat((self._output_tokens(batch_size), sparse_prompt_embeddings), dim=1)

        if repeat_image:
            image = torch.repeat_interleave(image_embeddings, batch_size, dim=0)
        elif image_embeddings.shape[0] != batch_size:
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {batch_size} prompts: pass one per prompt, "
                "or one image with repeat_image=True"
            )
        else:
            image = image_embeddings
        image = image + dense_prompt_embeddings
        if image_pe.shape[0] != 1:
            raise ValueError(f"image_pe must have batch size 1 (from get_dense_pe()), got {tuple(image_pe.shape)}")
        image_pe = torch.repeat_interleave(image_pe, batch_size, dim=0)

        token_out, image_tokens = self.transformer(image, image_pe, tokens)
        first = 1 if self.pred_obj_scores else 0  # index of the IoU token
        iou_token_out = token_out[:, first]
        mask_tokens_out = token_out[:, first + 1 : first + 1 + self.num_mask_tokens]

        upscaled = self._upscale(image_tokens.transpose(1, 2).reshape(image.shape), high_res_features)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, index]) for index, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        masks = (hyper_in @ upscaled.flatten(2)).unflatten(-1, upscaled.shape[-2:])

        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(token_out[:, 0])
        else:
            object_score_logits = iou_pred.new_full((iou_pred.shape[0], 1), OBJECT_PRESENT_LOGIT)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def _get_stability_scores(self, mask_logits: Tensor) -> Tensor:
        """Stability `[...]` of mask logits `[..., H, W]`: area above +delta over area above -delta."""
        assert self.stability_fallback is not None
        delta = self.stability_fallback.delta
        flat = mask_logits.flatten(-2)
        area_inner = torch.sum(flat > delta, dim=-1).float()
        area_outer = torch.sum(flat > -delta, dim=-1).float()
        return torch.where(area_outer > 0, area_inner / area_outer, 1.0)

    def _dynamic_multimask_via_stability(
        self, all_mask_logits: Tensor, all_iou_scores: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Single mask `[B, 1, h, w]` and IoU `[B, 1]`: token 0's answer if stable, else the multimask
        answer with the highest predicted IoU."""
        assert self.stability_fallback is not None
        best = torch.argmax(all_iou_scores[:, 1:], dim=-1) + 1
        rows = torch.arange(all_iou_scores.shape[0], device=all_iou_scores.device)
        best_logits = all_mask_logits[rows, best].unsqueeze(1)
        best_iou = all_iou_scores[rows, best].unsqueeze(1)

        single_logits, single_iou = all_mask_logits[:, 0:1], all_iou_scores[:, 0:1]
        is_stable = self._get_stability_scores(single_logits) >= self.stability_fallback.thresh
        mask_logits = torch.where(is_stable[..., None, None], single_logits, best_logits)
        iou_scores = torch.where(is_stable, single_iou, best_iou)
        return mask_logits, iou_scores
