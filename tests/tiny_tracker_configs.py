"""Two tiny tracker configs (as plain dicts, for Hydra `instantiate` on either side of a parity
test): a SAM 2.1-style model and a variant that takes the other branch of most switches."""

from __future__ import annotations

import copy

HIDDEN, MEM, IMAGE_SIZE = 32, 16, 128


# The SAM 2.1 tracking switches of the official configs, shared by every tiny test model.
SAM21_TRACKING_FLAGS = {
    "sigmoid_scale_for_mem_enc": 20.0,
    "sigmoid_bias_for_mem_enc": -10.0,
    "use_mask_input_as_output_without_sam": True,
    "directly_add_no_mem_embed": True,
    "no_obj_embed_spatial": True,
    "use_high_res_features_in_sam": True,
    "multimask_output_in_sam": True,
    "iou_prediction_use_sigmoid": True,
    "use_obj_ptrs_in_encoder": True,
    "add_tpos_enc_to_obj_ptrs": True,
    "proj_tpos_enc_in_obj_ptrs": True,
    "use_signed_tpos_enc_to_obj_ptrs": True,
    "only_obj_ptrs_in_the_past_for_eval": True,
    "pred_obj_scores": True,
    "pred_obj_scores_mlp": True,
    "fixed_no_obj_ptr": True,
    "multimask_output_for_tracking": True,
    "use_multimask_token_for_obj_ptr": True,
    "multimask_min_pt_num": 0,
    "multimask_max_pt_num": 1,
    "use_mlp_for_obj_ptr_proj": True,
}


def _attention(kv_in_dim: int | None = None) -> dict:
    att = {
        "_target_": "sam2.modeling.sam.transformer.RoPEAttention",
        "rope_theta": 10000.0,
        "feat_sizes": [8, 8],
        "embedding_dim": HIDDEN,
        "num_heads": 1,
        "downsample_rate": 1,
        "dropout": 0.0,
    }
    if kv_in_dim is not None:
        att.update(rope_k_repeat=True, kv_in_dim=kv_in_dim)
    return att


def _sine(num_pos_feats: int) -> dict:
    return {
        "_target_": "sam2.modeling.position_encoding.PositionEmbeddingSine",
        "num_pos_feats": num_pos_feats,
        "normalize": True,
        "scale": None,
        "temperature": 10000,
    }


# A tiny SAM 2.1: 6-block Hiera, 128 px input, width 32, memory width 16 (so each object
# pointer becomes two memory tokens). Dropout is 0 so training mode is deterministic too.
SAM21_TINY = {
    "_target_": "sam2.modeling.sam2_base.SAM2Base",
    "image_encoder": {
        "_target_": "sam2.modeling.backbones.image_encoder.ImageEncoder",
        "scalp": 1,
        "trunk": {
            "_target_": "sam2.modeling.backbones.hieradet.Hiera",
            "embed_dim": 16,
            "num_heads": 1,
            "stages": [1, 2, 2, 1],
            "global_att_blocks": [4],
            "window_pos_embed_bkg_spatial_size": [4, 4],
            "window_spec": [8, 4, 4, 2],
        },
        "neck": {
            "_target_": "sam2.modeling.backbones.image_encoder.FpnNeck",
            "position_encoding": _sine(HIDDEN),
            "d_model": HIDDEN,
            "backbone_channel_list": [128, 64, 32, 16],
            "fpn_top_down_levels": [2, 3],
            "fpn_interp_model": "nearest",
        },
    },
    "memory_attention": {
        "_target_": "sam2.modeling.memory_attention.MemoryAttention",
        "d_model": HIDDEN,
        "pos_enc_at_input": True,
        "layer": {
            "_target_": "sam2.modeling.memory_attention.MemoryAttentionLayer",
            "activation": "relu",
            "dim_feedforward": 64,
            "dropout": 0.0,
            "pos_enc_at_attn": False,
            "self_attention": _attention(),
            "d_model": HIDDEN,
            "pos_enc_at_cross_attn_keys": True,
            "pos_enc_at_cross_attn_queries": False,
            "cross_attention": _attention(kv_in_dim=MEM),
        },
        "num_layers": 2,
    },
    "memory_encoder": {
        "_target_": "sam2.modeling.memory_encoder.MemoryEncoder",
        "out_dim": MEM,
        "in_dim": HIDDEN,
        "position_encoding": _sine(MEM),
        "mask_downsampler": {
            "_target_": "sam2.modeling.memory_encoder.MaskDownSampler",
            "embed_dim": HIDDEN,
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
        },
        "fuser": {
            "_target_": "sam2.modeling.memory_encoder.Fuser",
            "layer": {
                "_target_": "sam2.modeling.memory_encoder.CXBlock",
                "dim": HIDDEN,
                "kernel_size": 7,
                "padding": 3,
                "layer_scale_init_value": 1e-6,
                "use_dwconv": True,
            },
            "num_layers": 2,
        },
    },
    "num_maskmem": 4,
    "image_size": IMAGE_SIZE,
    **SAM21_TRACKING_FLAGS,
    "compile_image_encoder": False,
}

# The other branch of most switches: SAM 2 pointers (no temporal encoding), memory as wide as
# the features, a dummy memory token on first frames, soft no-object pointers, binarised masks
# in memory, no high-res features, single-mask tracking, a prompted-frame limit and a stride.
# (Non-overlapping masks are compared on their own below: random weights give all objects
# nearly the same logits, so each pixel's winner would hinge on float rounding.)
SAM2_VARIANT = copy.deepcopy(SAM21_TINY)
for _key in ("no_obj_embed_spatial", "proj_tpos_enc_in_obj_ptrs", "use_signed_tpos_enc_to_obj_ptrs"):
    del SAM2_VARIANT[_key]
SAM2_VARIANT.update(
    add_tpos_enc_to_obj_ptrs=False,
    directly_add_no_mem_embed=False,
    soft_no_obj_ptr=True,
    fixed_no_obj_ptr=False,
    pred_obj_scores_mlp=False,
    use_mlp_for_obj_ptr_proj=False,
    use_high_res_features_in_sam=False,
    iou_prediction_use_sigmoid=False,
    multimask_output_for_tracking=False,
    use_multimask_token_for_obj_ptr=False,
    binarize_mask_from_pts_for_mem_enc=True,
    max_cond_frames_in_attn=2,
    memory_temporal_stride_for_eval=2,
    max_obj_ptrs_in_encoder=4,
    num_maskmem=5,
    sam_mask_decoder_extra_args={"dynamic_multimask_via_stability": True},
)
# A dummy memory token (no directly added no-memory embedding) needs memory as wide as the
# features, and cross-attention without rotary encoding (the official RoPE cannot take one token).
SAM2_VARIANT["memory_attention"]["layer"]["cross_attention"] = {
    "_target_": "sam2.modeling.sam.transformer.Attention",
    "embedding_dim": HIDDEN,
    "num_heads": 1,
    "downsample_rate": 1,
    "dropout": 0.0,
    "kv_in_dim": HIDDEN,
}
SAM2_VARIANT["memory_encoder"].update(out_dim=HIDDEN, position_encoding=_sine(HIDDEN))
