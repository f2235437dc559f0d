"""The eight model configs: the same values as the official files, and the same full-model state
dict (keys, shapes, dtypes) as the official model built from them."""

from __future__ import annotations

import gc
from contextlib import AbstractContextManager
from unittest import mock

import pytest
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

import sam2  # noqa: F401  (registers the configs)
from sam2.build_sam import build_sam2
from sam2.model_weights import state_dict_signature

pytestmark = pytest.mark.reference

# Only shapes and dtypes are compared here, so random initialisation (most of the build time of
# the large models) is skipped on both sides.
_INIT_FUNCTIONS = ["uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_"]


def _skip_init() -> AbstractContextManager:
    return mock.patch.multiple(torch.nn.init, **{name: (lambda t, *a, **k: t) for name in _INIT_FUNCTIONS})


CONFIGS = [f"configs/{v}/{v}_hiera_{s}.yaml" for v in ("sam2", "sam2.1") for s in ("t", "s", "b+", "l")]


@pytest.fixture(scope="module")
def ref_signatures(reference):
    """`{config: [(key, shape, dtype)]}` of the official model for every config."""
    return reference.run(
        """
        import gc
        from unittest import mock
        from sam2.build_sam import build_sam2
        skip_init = {fn: (lambda t, *a, **k: t) for fn in inputs["init_functions"]}
        for name in inputs["configs"]:
            with mock.patch.multiple(torch.nn.init, **skip_init):
                model = build_sam2(name, device="cpu", apply_postprocessing=False)
            outputs[name] = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
            del model
            gc.collect()
        """,
        configs=CONFIGS,
        init_functions=_INIT_FUNCTIONS,
    )


@pytest.mark.parametrize("config_name", CONFIGS)
def test_composed_config_equals_official_file(reference, config_name):
    ours = OmegaConf.to_container(compose(config_name=config_name))
    official = OmegaConf.to_container(OmegaConf.load(reference.root / "sam2" / config_name))
    assert ours == official


@pytest.mark.parametrize("config_name", CONFIGS)
def test_full_model_state_dict_matches_reference(ref_signatures, config_name):
    with _skip_init():
        model = build_sam2(config_name, device="cpu", apply_postprocessing=False)
    ours = state_dict_signature(model)
    del model
    gc.collect()
    ref = ref_signatures[config_name]
    assert len(ours) == len(ref)
    assert {k: rest for k, *rest in ours} == {k: rest for k, *rest in ref}
    # Order too: optimizer state in training checkpoints is stored by parameter position.
    assert [k for k, *_ in ours] == [k for k, *_ in ref]


@pytest.mark.parametrize("config_name", ["configs/sam2/sam2_hiera_t.yaml", "configs/sam2.1/sam2.1_hiera_t.yaml"])
def test_official_config_file_instantiates_unchanged(reference, ref_signatures, config_name):
    cfg = OmegaConf.load(reference.root / "sam2" / config_name)
    model = instantiate(cfg.model, _recursive_=True)
    assert type(model).__module__ == "sam2.modeling.sam2_base"
    ours, ref = state_dict_signature(model), ref_signatures[config_name]
    assert {k: rest for k, *rest in ours} == {k: rest for k, *rest in ref}


def test_sizes_differ_only_in_trunk_and_neck_channels():
    """The shared base carries everything else: two sizes compose to the same non-trunk values."""
    tiny = OmegaConf.to_container(compose(config_name="configs/sam2.1/sam2.1_hiera_t.yaml"))
    large = OmegaConf.to_container(compose(config_name="configs/sam2.1/sam2.1_hiera_l.yaml"))
    for cfg in (tiny, large):
        del cfg["model"]["image_encoder"]["trunk"]
        del cfg["model"]["image_encoder"]["neck"]["backbone_channel_list"]
    assert tiny == large
