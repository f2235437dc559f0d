"""The tiny SAM2Train shared by the SAM2Train tests: config, synthetic clip, helpers."""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from tests.tiny_tracker_configs import SAM21_TRACKING_FLAGS
from training.loss_fns import CORE_LOSS_KEY, MultiStepMultiMasksAndIous
from training.utils.data_utils import BatchedVideoDatapoint, BatchedVideoMetaData

NUM_FRAMES, NUM_OBJECTS, IMAGE_SIZE = 4, 2, 64

# A tiny SAM 2.1 with the MOSE fine-tune's tracking settings; eval prompts are deterministic
# (clicks at error centers, fixed numbers of prompted and corrected frames).
MODEL = {
    "_target_": "training.model.sam2.SAM2Train",
    "image_encoder": {
        "_target_": "sam2.modeling.backbones.image_encoder.ImageEncoder",
        "scalp": 1,
        "trunk": {
            "_target_": "sam2.modeling.backbones.hieradet.Hiera",
            "embed_dim": 8,
            "num_heads": 1,
            "stages": [1, 1, 2, 1],
            "global_att_blocks": [3],
            "window_spec": [4, 4, 2, 1],
            "window_pos_embed_bkg_spatial_size": [4, 4],
        },
        "neck": {
            "_target_": "sam2.modeling.backbones.image_encoder.FpnNeck",
            "position_encoding": {
                "_target_": "sam2.modeling.position_encoding.PositionEmbeddingSine",
                "num_pos_feats": 32,
                "normalize": True,
                "scale": None,
                "temperature": 10000,
            },
            "d_model": 32,
            "backbone_channel_list": [64, 32, 16, 8],
            "fpn_top_down_levels": [2, 3],
            "fpn_interp_model": "nearest",
        },
    },
    "memory_attention": {
        "_target_": "sam2.modeling.memory_attention.MemoryAttention",
        "d_model": 32,
        "pos_enc_at_input": True,
        "num_layers": 2,
        "layer": {
            "_target_": "sam2.modeling.memory_attention.MemoryAttentionLayer",
            "activation": "relu",
            "dim_feedforward": 64,
            "dropout": 0.1,
            "pos_enc_at_attn": False,
            "d_model": 32,
            "pos_enc_at_cross_attn_keys": True,
            "pos_enc_at_cross_attn_queries": False,
            "self_attention": {
                "_target_": "sam2.modeling.sam.transformer.RoPEAttention",
                "rope_theta": 10000.0,
                "feat_sizes": [4, 4],
                "embedding_dim": 32,
                "num_heads": 1,
                "downsample_rate": 1,
                "dropout": 0.1,
            },
            "cross_attention": {
                "_target_": "sam2.modeling.sam.transformer.RoPEAttention",
                "rope_theta": 10000.0,
                "feat_sizes": [4, 4],
                "rope_k_repeat": True,
                "embedding_dim": 32,
                "num_heads": 1,
                "downsample_rate": 1,
                "dropout": 0.1,
                "kv_in_dim": 16,
            },
        },
    },
    "memory_encoder": {
        "_target_": "sam2.modeling.memory_encoder.MemoryEncoder",
        "out_dim": 16,
        "in_dim": 32,
        "position_encoding": {
            "_target_": "sam2.modeling.position_encoding.PositionEmbeddingSine",
            "num_pos_feats": 16,
            "normalize": True,
            "scale": None,
            "temperature": 10000,
        },
        "mask_downsampler": {
            "_target_": "sam2.modeling.memory_encoder.MaskDownSampler",
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "embed_dim": 32,
        },
        "fuser": {
            "_target_": "sam2.modeling.memory_encoder.Fuser",
            "num_layers": 1,
            "layer": {
                "_target_": "sam2.modeling.memory_encoder.CXBlock",
                "dim": 32,
                "kernel_size": 7,
                "padding": 3,
                "layer_scale_init_value": 1e-6,
                "use_dwconv": True,
            },
        },
    },
    "num_maskmem": 3,
    "image_size": IMAGE_SIZE,
    **SAM21_TRACKING_FLAGS,
    # training
    "prob_to_use_pt_input_for_train": 0.5,
    "prob_to_use_box_input_for_train": 0.5,
    "prob_to_sample_from_gt_for_train": 0.1,
    "num_frames_to_correct_for_train": 2,
    "rand_frames_to_correct_for_train": True,
    "num_init_cond_frames_for_train": 2,
    "rand_init_cond_frames_for_train": True,
    "add_all_frames_to_correct_as_cond": True,
    "num_correction_pt_per_frame": 2,
    # eval: deterministic
    "prob_to_use_pt_input_for_eval": 1.0,
    "prob_to_use_box_input_for_eval": 0.0,
    "num_frames_to_correct_for_eval": 3,
    "rand_frames_to_correct_for_eval": False,
    "num_init_cond_frames_for_eval": 2,
    "rand_init_cond_frames_for_eval": False,
    "pt_sampling_for_eval": "center",
}

LOSS = dict(
    weight_dict={"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1},
    supervise_all_iou=True,
    iou_use_l1_loss=True,
    pred_obj_scores=True,
    focal_gamma_obj_score=0.0,
    focal_alpha_obj_score=-1.0,
)

COMPARED_KEYS = [
    "multistep_pred_multimasks_high_res",
    "multistep_pred_multimasks",
    "multistep_pred_ious",
    "multistep_object_score_logits",
    "multistep_pred_masks_high_res",
    "multistep_point_inputs",
    "pred_masks_high_res",
    "maskmem_features",
]


def batch_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(NUM_FRAMES, 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    masks = torch.zeros(NUM_FRAMES, NUM_OBJECTS, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    for t in range(NUM_FRAMES):
        masks[t, 0] = ((ys - 20 - 2 * t) ** 2 + (xs - 24 - t) ** 2) < 12**2
        masks[t, 1] = ((ys - 44).abs() < 9) & ((xs - 40 + 2 * t).abs() < 14)
    obj_to_frame_idx = torch.tensor([[[t, 0]] * NUM_OBJECTS for t in range(NUM_FRAMES)], dtype=torch.int)
    return {"img_batch": images, "masks": masks, "obj_to_frame_idx": obj_to_frame_idx}


def datapoint(tensors: dict[str, torch.Tensor]) -> BatchedVideoDatapoint:
    return BatchedVideoDatapoint(
        img_batch=tensors["img_batch"],
        obj_to_frame_idx=tensors["obj_to_frame_idx"],
        masks=tensors["masks"],
        metadata=BatchedVideoMetaData(
            unique_objects_identifier=torch.zeros(NUM_FRAMES, NUM_OBJECTS, 3, dtype=torch.long),
            frame_orig_size=torch.full((NUM_FRAMES, NUM_OBJECTS, 2), IMAGE_SIZE, dtype=torch.long),
        ),
        dict_key="all",
        batch_size=[NUM_FRAMES],
    )


# Shared by the reference snippet and our side: the compared view of the outputs.
SELECT_SRC = """
def select(frame_outputs, keys):
    return [{k: frame[k] for k in keys} for frame in frame_outputs]
"""


def select_outputs(frame_outputs, keys):
    namespace: dict = {}
    exec(SELECT_SRC, namespace)
    return namespace["select"](frame_outputs, keys)


def build(state_dict=None, **overrides):
    model = instantiate({**MODEL, **overrides}, _convert_="all")
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def visible_model(**overrides):
    torch.manual_seed(0)
    model = build(**overrides)
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(8.0)
    return model


def loss_and_grads(model, batch):
    frames = model(batch)
    losses = MultiStepMultiMasksAndIous(**LOSS)(frames, batch.masks)
    model.zero_grad(set_to_none=True)
    losses[CORE_LOSS_KEY].backward()
    return frames, losses
