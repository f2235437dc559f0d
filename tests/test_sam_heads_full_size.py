"""The SAM heads at the size of the official SAM 2.1 tiny model hold exactly the official checkpoint entries."""

from __future__ import annotations

import pytest
import torch

from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def ref_out(reference):
    # The official model is built from its own config, so the flags come from there, not from us.
    return reference.run(
        """
        import os, sam2
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        cfg = OmegaConf.load(os.path.join(os.path.dirname(sam2.__file__), "configs/sam2.1/sam2.1_hiera_t.yaml"))
        model = instantiate(cfg.model, _recursive_=True)
        def layout(module):
            return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
        outputs["prompt_encoder"] = layout(model.sam_prompt_encoder)
        outputs["mask_decoder"] = layout(model.sam_mask_decoder)
        outputs["flags"] = dict(
            embed_dim=model.sam_prompt_embed_dim,
            grid=model.sam_image_embedding_size,
            image_size=model.image_size,
            use_high_res_features=model.use_high_res_features_in_sam,
            iou_prediction_use_sigmoid=model.iou_prediction_use_sigmoid,
            pred_obj_scores=model.pred_obj_scores,
            pred_obj_scores_mlp=model.pred_obj_scores_mlp,
            use_multimask_token_for_obj_ptr=model.use_multimask_token_for_obj_ptr,
        )
        """
    )


def _layout(module: torch.nn.Module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def _load_zeros(module: torch.nn.Module, layout: dict) -> None:
    module.load_state_dict({k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in layout.items()}, strict=True)


def test_tiny_prompt_encoder_layout_matches_reference(ref_out):
    flags = ref_out["flags"]
    assert (flags["embed_dim"], flags["grid"], flags["image_size"]) == (256, 64, 1024)
    encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
    )
    assert _layout(encoder) == ref_out["prompt_encoder"]
    _load_zeros(encoder, ref_out["prompt_encoder"])


def test_tiny_mask_decoder_layout_matches_reference(ref_out):
    flags = ref_out["flags"]
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        use_high_res_features=flags["use_high_res_features"],
        iou_prediction_use_sigmoid=flags["iou_prediction_use_sigmoid"],
        pred_obj_scores=flags["pred_obj_scores"],
        pred_obj_scores_mlp=flags["pred_obj_scores_mlp"],
        use_multimask_token_for_obj_ptr=flags["use_multimask_token_for_obj_ptr"],
    )
    # SAM 2.1 uses every optional part, so every optional entry is checked.
    assert all(flags[k] for k in ("use_high_res_features", "pred_obj_scores", "pred_obj_scores_mlp"))
    assert _layout(decoder) == ref_out["mask_decoder"]
    _load_zeros(decoder, ref_out["mask_decoder"])
