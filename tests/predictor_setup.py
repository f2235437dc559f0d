"""A tiny SAM 2.1 model for the predictor tests, built the same way here and in the reference.

`tiny_model_config` is a plain dict (Hydra `_target_` style) of the sam2.1 architecture at 64 px
with narrow layers; both sides build it with `hydra.utils.instantiate`, so the same state dict
loads strictly into each. `PERTURB_SNIPPET` runs in the reference process to make random
weights less degenerate (see ARCHITECTURE.md section 3).
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.tiny_tracker_configs import SAM21_TRACKING_FLAGS

IMAGE_SIZE = 64
HIDDEN_DIM = 32
MEM_DIM = 16


def _rope_attention(feat_side: int, **extra: Any) -> dict[str, Any]:
    return {
        "_target_": "sam2.modeling.sam.transformer.RoPEAttention",
        "rope_theta": 10000.0,
        "feat_sizes": [feat_side, feat_side],
        "embedding_dim": HIDDEN_DIM,
        "num_heads": 1,
        "downsample_rate": 1,
        "dropout": 0.1,
        **extra,
    }


def tiny_model_config(target: str = "sam2.modeling.sam2_base.SAM2Base", **overrides: Any) -> dict[str, Any]:
    """The sam2.1 model config at 64 px with 8-wide Hiera, 32-wide heads, 16-wide memory."""
    feat_side = IMAGE_SIZE // 16
    sine = "sam2.modeling.position_encoding.PositionEmbeddingSine"
    config = {
        "_target_": target,
        "image_encoder": {
            "_target_": "sam2.modeling.backbones.image_encoder.ImageEncoder",
            "scalp": 1,
            "trunk": {
                "_target_": "sam2.modeling.backbones.hieradet.Hiera",
                "embed_dim": 8,
                "num_heads": 1,
                "stages": [1, 1, 2, 1],
                "global_att_blocks": [3],
                "window_pos_embed_bkg_spatial_size": [4, 4],
                "window_spec": [4, 4, 4, 2],
            },
            "neck": {
                "_target_": "sam2.modeling.backbones.image_encoder.FpnNeck",
                "position_encoding": {
                    "_target_": sine,
                    "num_pos_feats": HIDDEN_DIM,
                    "normalize": True,
                    "scale": None,
                    "temperature": 10000,
                },
                "d_model": HIDDEN_DIM,
                "backbone_channel_list": [64, 32, 16, 8],
                "fpn_top_down_levels": [2, 3],
                "fpn_interp_model": "nearest",
            },
        },
        "memory_attention": {
            "_target_": "sam2.modeling.memory_attention.MemoryAttention",
            "d_model": HIDDEN_DIM,
            "pos_enc_at_input": True,
            "num_layers": 2,
            "layer": {
                "_target_": "sam2.modeling.memory_attention.MemoryAttentionLayer",
                "activation": "relu",
                "dim_feedforward": 64,
                "dropout": 0.1,
                "pos_enc_at_attn": False,
                "d_model": HIDDEN_DIM,
                "pos_enc_at_cross_attn_keys": True,
                "pos_enc_at_cross_attn_queries": False,
                "self_attention": _rope_attention(feat_side),
                "cross_attention": _rope_attention(feat_side, rope_k_repeat=True, kv_in_dim=MEM_DIM),
            },
        },
        "memory_encoder": {
            "_target_": "sam2.modeling.memory_encoder.MemoryEncoder",
            "out_dim": MEM_DIM,
            "in_dim": HIDDEN_DIM,
            "position_encoding": {
                "_target_": sine,
                "num_pos_feats": MEM_DIM,
                "normalize": True,
                "scale": None,
                "temperature": 10000,
            },
            "mask_downsampler": {
                "_target_": "sam2.modeling.memory_encoder.MaskDownSampler",
                "kernel_size": 3,
                "stride": 2,
                "padding": 1,
                "embed_dim": HIDDEN_DIM,
            },
            "fuser": {
                "_target_": "sam2.modeling.memory_encoder.Fuser",
                "num_layers": 1,
                "layer": {
                    "_target_": "sam2.modeling.memory_encoder.CXBlock",
                    "dim": HIDDEN_DIM,
                    "kernel_size": 7,
                    "padding": 3,
                    "layer_scale_init_value": 1e-6,
                    "use_dwconv": True,
                },
            },
        },
        "num_maskmem": 7,
        "image_size": IMAGE_SIZE,
        **SAM21_TRACKING_FLAGS,
        "compile_image_encoder": False,
    }
    config.update(overrides)
    return config


def build_tiny_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Our model from `config`, with `state_dict` loaded strictly, in eval mode."""
    model = instantiate(OmegaConf.create(config), _recursive_=True)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# Runs in the reference process with `model` in scope: every weight gets noise (zero-initialised
# embeddings included) so that no branch is trivially zero, and the object-score head's output
# bias is raised so that frames carry real masks instead of "no object" everywhere.
PERTURB_SNIPPET = """
torch.manual_seed(1)
with torch.no_grad():
    for param in model.parameters():
        param.add_(torch.randn_like(param) * 0.05)
    model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(4.0)
"""


def snippet(*parts: Any) -> str:
    """Reference-process code from dedented strings and module-level functions (their source), so
    one function can drive our predictor and the reference one alike."""
    import inspect
    import textwrap

    return "\n".join(textwrap.dedent(part) if isinstance(part, str) else inspect.getsource(part) for part in parts)
