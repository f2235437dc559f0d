from __future__ import annotations

import pytest
import torch

from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from tests.reference import assert_close

IN_DIM, OUT_DIM, MASK_SIZE, FEAT_SIZE, BATCH = 32, 16, 128, 8, 2


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "pix_feat": torch.randn(BATCH, IN_DIM, FEAT_SIZE, FEAT_SIZE, generator=gen),
        "mask_logits": torch.randn(BATCH, 1, MASK_SIZE, MASK_SIZE, generator=gen) * 4,
        "fuser_x": torch.randn(BATCH, IN_DIM, FEAT_SIZE, FEAT_SIZE, generator=gen),
        "grad_weight": torch.randn(BATCH, OUT_DIM, FEAT_SIZE, FEAT_SIZE, generator=gen),
    }


# Two variants: the shape of the official configs (3x3 stride-2 downsampler, out_dim < in_dim) and
# the class defaults (4x4 stride-4 downsampler) with the rarer options switched on.
_REFERENCE_SNIPPET = f"""
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine

def perturbed(module):
    # Layer scale starts at 1e-6 and norms at identity: noise makes every parameter matter.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return module

torch.manual_seed(0)
config_like = perturbed(MemoryEncoder(
    out_dim={OUT_DIM},
    mask_downsampler=MaskDownSampler(embed_dim={IN_DIM}, kernel_size=3, stride=2, padding=1),
    fuser=Fuser(CXBlock(dim={IN_DIM}, kernel_size=7, padding=3, layer_scale_init_value=1e-6), num_layers=2),
    position_encoding=PositionEmbeddingSine(num_pos_feats={OUT_DIM}, normalize=True),
    in_dim={IN_DIM},
))
with_options = perturbed(MemoryEncoder(
    out_dim={IN_DIM},
    mask_downsampler=MaskDownSampler(embed_dim={IN_DIM}),
    fuser=Fuser(
        CXBlock(dim={IN_DIM}, kernel_size=3, padding=1, layer_scale_init_value=0.0, use_dwconv=False),
        num_layers=1, dim={IN_DIM}, input_projection=True,
    ),
    position_encoding=PositionEmbeddingSine(num_pos_feats={IN_DIM}, normalize=True),
    in_dim={IN_DIM},
))
for name, enc in [("config_like", config_like), ("with_options", with_options)]:
    outputs[name + "_sd"] = enc.state_dict()
    outputs[name + "_downsampled"] = enc.mask_downsampler(torch.sigmoid(inputs["mask_logits"]))
    outputs[name + "_fused"] = enc.fuser(inputs["fuser_x"])
    outputs[name + "_out"] = enc(inputs["pix_feat"], inputs["mask_logits"])
    outputs[name + "_out_skip"] = enc(inputs["pix_feat"], inputs["mask_logits"], skip_mask_sigmoid=True)

pix_feat = inputs["pix_feat"].clone().requires_grad_()
masks = inputs["mask_logits"].clone().requires_grad_()
(config_like(pix_feat, masks)["vision_features"] * inputs["grad_weight"]).sum().backward()
outputs["grads"] = {{"pix_feat": pix_feat.grad, "masks": masks.grad}}
outputs["param_grads"] = {{n: p.grad for n, p in config_like.named_parameters()}}

cfg = OmegaConf.load(inputs["tiny_config"])
full = instantiate(cfg.model.memory_encoder, _recursive_=True)
outputs["tiny_shapes"] = {{k: (tuple(v.shape), v.dtype) for k, v in full.state_dict().items()}}
"""


@pytest.fixture(scope="module")
def ref_out(reference):
    tiny_config = reference.root / "sam2" / "configs" / "sam2.1" / "sam2.1_hiera_t.yaml"
    return reference.run(_REFERENCE_SNIPPET, tiny_config=str(tiny_config), **_inputs())


def _ours_parts(variant: str) -> tuple[MaskDownSampler, Fuser, int]:
    """Our mask downsampler, fuser and out_dim, built like the reference snippet's `variant`."""
    if variant == "config_like":
        downsampler = MaskDownSampler(embed_dim=IN_DIM, kernel_size=3, stride=2, padding=1)
        fuser = Fuser(CXBlock(dim=IN_DIM, kernel_size=7, padding=3, layer_scale_init_value=1e-6), num_layers=2)
        return downsampler, fuser, OUT_DIM
    block = CXBlock(dim=IN_DIM, kernel_size=3, padding=1, layer_scale_init_value=0.0, use_dwconv=False)
    return MaskDownSampler(embed_dim=IN_DIM), Fuser(block, num_layers=1, dim=IN_DIM, input_projection=True), IN_DIM


def _loaded(variant: str, ref_out) -> MemoryEncoder:
    downsampler, fuser, out_dim = _ours_parts(variant)
    encoder = MemoryEncoder(
        out_dim=out_dim,
        mask_downsampler=downsampler,
        fuser=fuser,
        position_encoding=PositionEmbeddingSine(num_pos_feats=out_dim, normalize=True),
        in_dim=IN_DIM,
    )
    encoder.load_state_dict(ref_out[f"{variant}_sd"], strict=True)
    return encoder


def _sub_state_dict(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


VARIANTS = ["config_like", "with_options"]


@pytest.mark.reference
@pytest.mark.parametrize("variant", VARIANTS)
def test_mask_downsampler_and_fuser_match_reference(variant, ref_out):
    downsampler, fuser, _ = _ours_parts(variant)
    state_dict, x = ref_out[f"{variant}_sd"], _inputs()
    downsampler.load_state_dict(_sub_state_dict(state_dict, "mask_downsampler."), strict=True)
    fuser.load_state_dict(_sub_state_dict(state_dict, "fuser."), strict=True)
    downsampled = downsampler(torch.sigmoid(x["mask_logits"]))
    assert downsampled.shape == (BATCH, IN_DIM, FEAT_SIZE, FEAT_SIZE)
    assert_close(downsampled, ref_out[f"{variant}_downsampled"])
    assert_close(fuser(x["fuser_x"]), ref_out[f"{variant}_fused"])


@pytest.mark.reference
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_memory_encoder_matches_reference(variant, skip_mask_sigmoid, ref_out):
    encoder, x = _loaded(variant, ref_out), _inputs()
    out = encoder(x["pix_feat"], x["mask_logits"], skip_mask_sigmoid=skip_mask_sigmoid)
    expected = ref_out[f"{variant}_out_skip" if skip_mask_sigmoid else f"{variant}_out"]
    assert_close(out, expected)
    dim = OUT_DIM if variant == "config_like" else IN_DIM
    assert out["vision_features"].shape == (BATCH, dim, FEAT_SIZE, FEAT_SIZE)


@pytest.mark.reference
def test_memory_encoder_gradients_match_reference(ref_out):
    encoder, x = _loaded("config_like", ref_out), _inputs()
    pix_feat = x["pix_feat"].clone().requires_grad_()
    masks = x["mask_logits"].clone().requires_grad_()
    (encoder(pix_feat, masks)["vision_features"] * x["grad_weight"]).sum().backward()
    assert_close({"pix_feat": pix_feat.grad, "masks": masks.grad}, ref_out["grads"])
    # Weight gradients sum over every pixel of every sample: the thread count changes the order of
    # that sum (bit-equal at one thread), so compare relative to each gradient's magnitude.
    for name, param in encoder.named_parameters():
        expected = ref_out["param_grads"][name]
        assert_close(param.grad, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), path=name)


@pytest.mark.reference
def test_full_size_tiny_config_has_reference_state_dict(reference, ref_out):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(reference.root / "sam2" / "configs" / "sam2.1" / "sam2.1_hiera_t.yaml")
    encoder = instantiate(cfg.model.memory_encoder, _recursive_=True)
    assert isinstance(encoder, MemoryEncoder)
    ours = {k: (tuple(v.shape), v.dtype) for k, v in encoder.state_dict().items()}
    assert ours == ref_out["tiny_shapes"]


def test_mask_downsampler_rejects_stride_that_does_not_divide_total_stride():
    with pytest.raises(ValueError, match="total_stride=16, stride=3"):
        MaskDownSampler(stride=3, total_stride=16)


def test_fuser_input_projection_needs_dim():
    with pytest.raises(ValueError, match="dim"):
        Fuser(CXBlock(8), num_layers=1, input_projection=True)


def test_cxblock_drop_path_only_acts_in_training():
    torch.manual_seed(0)
    block = CXBlock(8, drop_path=0.5)
    x = torch.randn(16, 8, 4, 4)
    with torch.no_grad():
        block.gamma.fill_(1.0)
        assert torch.equal(block.eval()(x), block.eval()(x))
        # With drop probability 0.5 over 16 samples, some residual branches are dropped entirely.
        dropped = (block.train()(x) == x).flatten(1).all(dim=1)
    assert 0 < int(dropped.sum()) < 16


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    encoder = MemoryEncoder(
        out_dim=8,
        mask_downsampler=MaskDownSampler(embed_dim=16, kernel_size=3, stride=2, padding=1, total_stride=4),
        fuser=Fuser(CXBlock(16), num_layers=2, dim=16, input_projection=True),
        position_encoding=PositionEmbeddingSine(num_pos_feats=8, normalize=True),
        in_dim=16,
    )
    out = encoder(torch.randn(1, 16, 4, 4), torch.randn(1, 1, 16, 16))
    out["vision_features"].square().sum().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing

