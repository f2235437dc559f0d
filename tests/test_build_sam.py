"""build_sam2 / build_sam2_video_predictor: config names, checkpoints both ways with the official
code, and the errors a user meets (wrong size, unknown config, corrupt file, hub id)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sam2.build_sam import (
    build_sam2,
    build_sam2_hf,
    build_sam2_video_predictor,
    resolve_config_name,
    resolve_pretrained,
)
from sam2.model_weights import CheckpointError, guess_model_config, load_model_weights

TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def our_tiny(ckpt_dir) -> dict[str, torch.Tensor]:
    """Our tiny SAM 2.1 with random weights, also saved as `ours.pt`."""
    torch.manual_seed(0)
    state_dict = build_sam2("sam2.1_hiera_t", device="cpu").state_dict()
    torch.save({"model": state_dict}, ckpt_dir / "ours.pt")
    return state_dict


@pytest.fixture(scope="module")
def ref_out(reference, our_tiny, ckpt_dir):
    """The reference loads our checkpoint with its own builder and writes one of its own."""
    return reference.run(
        """
        from sam2.build_sam import build_sam2
        ours = build_sam2(inputs["config"], inputs["ours"], device="cpu")
        outputs["loaded_ours"] = ours.state_dict()
        torch.manual_seed(1)
        theirs = build_sam2(inputs["config"], device="cpu")
        torch.save({"model": theirs.state_dict()}, inputs["theirs"])
        outputs["theirs"] = theirs.state_dict()
        """,
        config=TINY,
        ours=str(ckpt_dir / "ours.pt"),
        theirs=str(ckpt_dir / "theirs.pt"),
    )


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched[:5]


@pytest.mark.reference
def test_reference_checkpoint_loads_into_ours(ref_out, ckpt_dir):
    model = build_sam2("sam2.1_hiera_t", ckpt_dir / "theirs.pt", device="cpu")
    assert not model.training
    _assert_same_weights(model.state_dict(), ref_out["theirs"])


@pytest.mark.reference
def test_our_checkpoint_loads_into_reference(ref_out, our_tiny):
    _assert_same_weights(ref_out["loaded_ours"], our_tiny)


@pytest.mark.parametrize(
    "name",
    ["sam2.1_hiera_b+", "sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus", "configs/sam2.1/sam2.1_hiera_b+.yaml"],
)
def test_short_names_resolve_to_official_paths(name):
    assert resolve_config_name(name) == "configs/sam2.1/sam2.1_hiera_b+.yaml"


def test_sam2_short_names():
    assert resolve_config_name("sam2_hiera_l") == "configs/sam2/sam2_hiera_l.yaml"
    assert resolve_config_name("sam2_hiera_t.yaml") == "configs/sam2/sam2_hiera_t.yaml"


def test_default_device_and_train_mode():
    model = build_sam2("sam2.1_hiera_t", mode="train", apply_postprocessing=False)
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.training
    assert not model.sam_mask_decoder.dynamic_multimask_via_stability


def test_postprocessing_and_overrides_reach_the_model():
    model = build_sam2("sam2.1_hiera_t", device="cpu", hydra_overrides_extra=["++model.max_cond_frames_in_attn=3"])
    assert model.sam_mask_decoder.dynamic_multimask_via_stability
    assert model.max_cond_frames_in_attn == 3


def test_video_predictor_builder_applies_official_postprocessing(ckpt_dir, our_tiny):
    predictor = build_sam2_video_predictor("sam2.1_hiera_t", ckpt_dir / "ours.pt", device="cpu")
    assert type(predictor).__name__ == "SAM2VideoPredictor"
    assert predictor.binarize_mask_from_pts_for_mem_enc
    assert predictor.fill_hole_area == 8
    assert predictor.sam_mask_decoder.dynamic_multimask_via_stability
    _assert_same_weights(predictor.state_dict(), our_tiny)


def test_wrong_size_checkpoint_names_config_keys_and_probable_size(ckpt_dir):
    small = build_sam2("sam2.1_hiera_s", device="cpu").state_dict()
    assert guess_model_config(small) == "sam2.1_hiera_s"
    path = ckpt_dir / "small.pt"
    torch.save({"model": small}, path)
    with pytest.raises(CheckpointError) as info:
        build_sam2("sam2.1_hiera_t", path, device="cpu")
    message = str(info.value)
    assert "'sam2.1_hiera_t'" in message
    assert "2 missing key(s): image_encoder.trunk.blocks.10.proj.weight" in message
    assert "50 unexpected key(s): image_encoder.trunk.blocks.12." in message
    assert "22 shape mismatch(es)" in message
    assert "'sam2.1_hiera_s'" in message
    assert "small.pt" in message


def test_sam2_checkpoint_into_sam21_config_is_told_apart(our_tiny, ckpt_dir):
    sam2_tiny = {k: v for k, v in our_tiny.items() if k != "no_obj_embed_spatial" and "obj_ptr_tpos_proj" not in k}
    assert guess_model_config(sam2_tiny) == "sam2_hiera_t"
    path = ckpt_dir / "sam2_tiny.pt"
    torch.save({"model": sam2_tiny}, path)
    with pytest.raises(CheckpointError, match=r"3 missing key\(s\): no_obj_embed_spatial") as info:
        build_sam2(TINY, path, device="cpu")
    assert "'sam2_hiera_t'" in str(info.value)


def test_ddp_prefixed_checkpoint_gets_a_hint(our_tiny, ckpt_dir):
    path = ckpt_dir / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in our_tiny.items()}}, path)
    with pytest.raises(CheckpointError, match="module"):
        build_sam2("sam2.1_hiera_t", path, device="cpu")


def test_unknown_config_lists_the_known_names():
    with pytest.raises(FileNotFoundError, match=r"sam2\.1_hiera_xl.*sam2\.1_hiera_b\+"):
        build_sam2("sam2.1_hiera_xl", device="cpu")


def test_corrupt_checkpoint(our_tiny, ckpt_dir, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((ckpt_dir / "ours.pt").read_bytes()[:100_000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 100)
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            build_sam2("sam2.1_hiera_t", path, device="cpu")


def test_missing_file_and_missing_model_entry(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_sam2("sam2.1_hiera_t", tmp_path / "nope.pt", device="cpu")
    path = tmp_path / "no_model.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="no 'model' entry.*state_dict"):
        build_sam2("sam2.1_hiera_t", path, device="cpu")


def test_hub_ids_are_refused_with_download_instructions():
    with pytest.raises(ValueError, match=r"local files only.*sam2\.1_hiera_tiny\.pt"):
        build_sam2_hf("facebook/sam2.1-hiera-tiny", device="cpu")
    with pytest.raises(ValueError, match="local files only"):
        build_sam2("facebook/sam2.1-hiera-tiny", device="cpu")


def test_pretrained_from_local_file_or_folder(our_tiny, ckpt_dir, tmp_path):
    official_name = tmp_path / "sam2.1_hiera_tiny.pt"
    official_name.symlink_to(ckpt_dir / "ours.pt")
    assert resolve_pretrained(official_name) == (TINY, str(official_name))
    # Any other name: the config is told from the weights' shapes.
    assert resolve_pretrained(ckpt_dir / "ours.pt") == (TINY, str(ckpt_dir / "ours.pt"))
    model = build_sam2_hf(tmp_path, device="cpu")
    _assert_same_weights(model.state_dict(), our_tiny)


def test_training_checkpoint_with_optimizer_state_loads(our_tiny, tmp_path):
    """The trainer's checkpoint.pt holds the same "model" entry next to its own state."""
    path = tmp_path / "checkpoint.pt"
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    torch.save({"model": our_tiny, "optimizer": optimizer, "epoch": 2, "steps": {"train": 10}}, path)
    model = build_sam2("sam2.1_hiera_t", path, device="cpu")
    _assert_same_weights(model.state_dict(), our_tiny)
    load_model_weights(model, path, config_name="sam2.1_hiera_t")
