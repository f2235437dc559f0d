"""Writing a frame into memory: from predicted mask logits to the memory encoder's input, and the
occlusion embedding added afterwards."""

from __future__ import annotations

import torch
from torch import Tensor

from sam2.modeling.tracking.options import MemoryOptions

# Overlapping objects lose a pixel by having its logit capped here (sigmoid(-10) = 4.5e-5).
SUPPRESSED_LOGIT = -10.0


def apply_non_overlapping_constraints(pred_masks: Tensor) -> Tensor:
    """Keep each pixel only for the object with the highest logit there.

    Args:
        pred_masks: `[N, 1, H, W]` logits of the N objects of one video frame.

    Returns:
        `[N, 1, H, W]`; every other object's logit at that pixel is capped at -10.
    """
    num_objects = pred_masks.size(0)
    if num_objects == 1:
        return pred_masks
    winner = torch.argmax(pred_masks, dim=0, keepdim=True)
    object_ids = torch.arange(num_objects, device=pred_masks.device)[:, None, None, None]
    return torch.where(winner == object_ids, pred_masks, pred_masks.clamp(max=SUPPRESSED_LOGIT))


def mask_for_memory_encoder(
    pred_masks_high_res: Tensor, *, options: MemoryOptions, is_mask_from_pts: bool, training: bool
) -> Tensor:
    """The mask image the memory encoder sees, `[B, 1, H, W]`, from mask logits of that shape.

    In eval, objects may be made disjoint and a mask from clicks binarised (both per `options`);
    then probabilities are scaled and shifted by `sigmoid_{scale,bias}_for_mem_enc`.
    """
    if options.non_overlap_masks_for_mem_enc and not training:
        # Only meaningful at eval, where the batch holds all the objects of one video.
        pred_masks_high_res = apply_non_overlapping_constraints(pred_masks_high_res)
    if options.binarize_mask_from_pts_for_mem_enc and is_mask_from_pts and not training:
        mask = (pred_masks_high_res > 0).float()
    else:
        mask = torch.sigmoid(pred_masks_high_res)
    # Skipping the identity scale/bias keeps results bit-identical to the official code.
    if options.sigmoid_scale_for_mem_enc != 1.0:
        mask = mask * options.sigmoid_scale_for_mem_enc
    if options.sigmoid_bias_for_mem_enc != 0.0:
        mask = mask + options.sigmoid_bias_for_mem_enc
    return mask


def add_no_object_embedding(
    maskmem_features: Tensor, object_score_logits: Tensor, no_obj_embed_spatial: Tensor
) -> Tensor:
    """Mark the memory of frames where the object is predicted absent.

    Args:
        maskmem_features: `[B, C_mem, h, w]`.
        object_score_logits: `[B, 1]`, > 0 for a visible object.
        no_obj_embed_spatial: `[1, C_mem]`, added at every position of an absent object's memory.

    Returns:
        `[B, C_mem, h, w]`.
    """
    absent = 1 - (object_score_logits > 0).float()
    embedding = no_obj_embed_spatial[..., None, None].expand(*maskmem_features.shape)
    return maskmem_features + absent[..., None, None] * embedding
