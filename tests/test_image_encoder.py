"""ImageEncoder and FpnNeck: parity with the official code on a tiny Hiera trunk."""

from __future__ import annotations

import pytest
import torch

from sam2.modeling.backbones.hieradet import Hiera, MultiScaleAttention
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from tests.reference import assert_close_scaled
from tests.test_hiera import TINY, attend_padding

pytestmark = pytest.mark.reference

D_MODEL = 32
CHANNELS = [128, 64, 32, 16]
# "official": the shipped configs' neck (nearest, top-down on the two finest levels, coarsest
# level scalped); "all_levels": bilinear top-down everywhere, averaged, nothing scalped.
VARIANTS = {
    "official": dict(scalp=1, neck=dict(fpn_interp_model="nearest", fpn_top_down_levels=[2, 3])),
    "all_levels": dict(scalp=0, neck=dict(fpn_interp_model="bilinear", fuse_type="avg")),
}
IMAGE_SIZES = {"square_64": (64, 64), "wide_64x96": (64, 96)}


def _images() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(2, 3, h, w, generator=gen) for name, (h, w) in IMAGE_SIZES.items()}


def _build(variant: dict) -> ImageEncoder:
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(num_pos_feats=D_MODEL, normalize=True, scale=None, temperature=10000),
        d_model=D_MODEL,
        backbone_channel_list=CHANNELS,
        **variant["neck"],
    )
    return ImageEncoder(trunk=Hiera(**TINY), neck=neck, scalp=variant["scalp"]).eval()


def _loss(out: dict) -> torch.Tensor:
    return sum((f * (i + 1)).sin().sum() for i, f in enumerate(out["backbone_fpn"]))


@pytest.fixture(scope="module")
def ref_out(reference):
    return reference.run(
        """
        from sam2.modeling.backbones.hieradet import Hiera, MultiScaleAttention
        from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
        from sam2.modeling.position_encoding import PositionEmbeddingSine

        for seed, (name, variant) in enumerate(inputs["variants"].items()):
            torch.manual_seed(seed)
            neck = FpnNeck(
                position_encoding=PositionEmbeddingSine(num_pos_feats=inputs["d_model"], normalize=True, scale=None, temperature=10000),
                d_model=inputs["d_model"],
                backbone_channel_list=inputs["channels"],
                **variant["neck"],
            )
            encoder = ImageEncoder(trunk=Hiera(**inputs["cfg"]), neck=neck, scalp=variant["scalp"]).eval()
            with torch.no_grad():
                for p in encoder.parameters():
                    p.add_(0.2 * torch.randn_like(p))
            result = {"state_dict": encoder.state_dict()}
            with torch.no_grad():
                result["outputs"] = {size: encoder(img) for size, img in inputs["images"].items()}
            img = inputs["images"]["wide_64x96"].clone().requires_grad_(True)
            out = encoder(img)
            sum((f * (i + 1)).sin().sum() for i, f in enumerate(out["backbone_fpn"])).backward()
            result["input_grad"] = img.grad
            result["param_grads"] = {n: p.grad for n, p in encoder.named_parameters()}
            outputs[name] = result
        """,
        variants=VARIANTS,
        cfg=TINY,
        d_model=D_MODEL,
        channels=CHANNELS,
        images=_images(),
    )


@pytest.mark.parametrize("size", list(IMAGE_SIZES))
@pytest.mark.parametrize("variant", list(VARIANTS))
@attend_padding
def test_encoder_outputs_match_reference(ref_out, variant, size, attend_padding, monkeypatch):
    monkeypatch.setattr(MultiScaleAttention, "attend_padding", attend_padding)
    encoder = _build(VARIANTS[variant])
    encoder.load_state_dict(ref_out[variant]["state_dict"], strict=True)
    with torch.no_grad():
        out = encoder(_images()[size])
    expected = ref_out[variant]["outputs"][size]
    num_levels = 4 - VARIANTS[variant]["scalp"]
    assert len(out["backbone_fpn"]) == len(out["vision_pos_enc"]) == num_levels
    assert out["vision_features"] is out["backbone_fpn"][-1]
    h, w = IMAGE_SIZES[size]
    assert out["backbone_fpn"][0].shape == (2, D_MODEL, h // 4, w // 4)
    assert_close_scaled(out, expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
@attend_padding
def test_encoder_gradients_match_reference(ref_out, variant, attend_padding, monkeypatch):
    monkeypatch.setattr(MultiScaleAttention, "attend_padding", attend_padding)
    encoder = _build(VARIANTS[variant])
    encoder.load_state_dict(ref_out[variant]["state_dict"], strict=True)
    img = _images()["wide_64x96"].requires_grad_(True)
    _loss(encoder(img)).backward()
    grads = {name: p.grad for name, p in encoder.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert_close_scaled(img.grad, ref_out[variant]["input_grad"])
    assert_close_scaled(grads, ref_out[variant]["param_grads"])


def test_top_down_levels_only_touch_the_named_levels(ref_out):
    """With top-down on levels [2, 3] only, levels 0 and 1 are their lateral projections alone."""
    encoder = _build(VARIANTS["official"])
    encoder.load_state_dict(ref_out["official"]["state_dict"], strict=True)
    with torch.no_grad():
        trunk_features = encoder.trunk(_images()["square_64"])
        out = encoder(_images()["square_64"])
        for level in (0, 1):
            lateral = encoder.neck.convs[3 - level](trunk_features[level])
            assert torch.equal(out["backbone_fpn"][level], lateral)
        assert not torch.allclose(out["backbone_fpn"][2], encoder.neck.convs[1](trunk_features[2]))


def test_mismatched_channels_name_both_lists():
    neck = FpnNeck(PositionEmbeddingSine(D_MODEL), d_model=D_MODEL, backbone_channel_list=[256, 128, 64, 32])
    with pytest.raises(ValueError, match=r"\[256, 128, 64, 32\].*\[128, 64, 32, 16\]"):
        ImageEncoder(trunk=Hiera(**TINY), neck=neck)


def test_unknown_fuse_type_is_rejected():
    with pytest.raises(ValueError, match="'max'"):
        FpnNeck(PositionEmbeddingSine(D_MODEL), d_model=D_MODEL, backbone_channel_list=CHANNELS, fuse_type="max")
