"""Checkpoint writing and weight loading: atomic saves, the official loader names, clear key errors."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from training.engine.checkpointer import (
    NonFiniteWeightsError,
    capture_rng_state,
    model_state_for_saving,
    restore_rng_state,
)
from training.utils.checkpoint_utils import (
    CkptExcludeKernel,
    assert_skipped_parameters_are_frozen,
    load_checkpoint_and_apply_kernels,
    load_state_dict_into_model,
    save_checkpoint_atomic,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint_atomic({"model": {"w": torch.ones(3)}, "epoch": 1}, str(path))

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_atomic({"model": {"w": torch.zeros(3)}, "epoch": 2}, str(path))
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind
    survivor = torch.load(path, weights_only=True)
    assert survivor["epoch"] == 1 and torch.equal(survivor["model"]["w"], torch.ones(3))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    save_checkpoint_atomic({"rng": state}, str(tmp_path / "c.pt"))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_saved_weights_have_plain_names_and_must_be_finite():
    model = tiny_model()
    wrapped = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(wrapped)
    wrapped.module = model
    assert set(model_state_for_saving(wrapped, [])) == set(model.state_dict())
    assert set(model_state_for_saving(model, ["0.*"])) == {"1.weight", "1.bias", "2.weight", "2.bias"}
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="2.bias"):
        model_state_for_saving(model, [])


def test_official_initializer_config_loads_weights(tmp_path):
    source = tiny_model()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    path = tmp_path / "weights.pt"
    torch.save({"model": source.state_dict()}, path)
    initializer = instantiate(
        {
            "_partial_": True,
            "_target_": "training.utils.checkpoint_utils.load_state_dict_into_model",
            "strict": True,
            "ignore_unexpected_keys": None,
            "ignore_missing_keys": None,
            "state_dict": {
                "_target_": "training.utils.checkpoint_utils.load_checkpoint_and_apply_kernels",
                "checkpoint_path": str(path),
                "ckpt_state_dict_keys": ["model"],
            },
        }
    )
    target = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    loaded = initializer(model=target)
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


def test_key_mismatches_are_reported_with_names_and_counts(tmp_path):
    state = tiny_model().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    with pytest.raises(KeyError, match=r"1 missing keys \['2.bias'\]; 1 unexpected keys \['extra.weight'\]"):
        load_state_dict_into_model(state, tiny_model())
    # Missing keys pass when not strict; the exclude kernel drops unexpected ones.
    load_state_dict_into_model(state, tiny_model(), strict=False, checkpoint_kernels=[CkptExcludeKernel(["extra.*"])])
    load_state_dict_into_model(state, tiny_model(), ignore_missing_keys=["2.*"], ignore_unexpected_keys=["extra.*"])


def test_loader_errors_name_the_file_and_the_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint_and_apply_kernels(str(tmp_path / "nowhere.pt"))
    torch.save({"state": {}}, tmp_path / "c.pt")
    with pytest.raises(KeyError, match=r"no key 'model'; it has \['state'\]"):
        load_checkpoint_and_apply_kernels(str(tmp_path / "c.pt"), ckpt_state_dict_keys=["model"])


def test_skipped_parameters_must_be_frozen():
    model = tiny_model()
    with pytest.raises(ValueError, match="skip_saving_parameters leaves out trainable"):
        assert_skipped_parameters_are_frozen(model, ["0.*"])
    model[0].requires_grad_(False)
    assert_skipped_parameters_are_frozen(model, ["0.*"])
