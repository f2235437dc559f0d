"""Training checkpoints: what goes in, writing them atomically, and reading them back for resume.

Layout of `<save_dir>/checkpoint.pt` (every value loads with `torch.load(weights_only=True)`):

    model          state dict with plain names (no `module.` prefix), as `build_sam2` expects
    optimizer      optimizer state dict
    scaler         GradScaler state (fp16 AMP only)
    loss           loss-module state dict
    epoch          the epoch to run next, or the one in progress when `batch_in_epoch` > 0
    batch_in_epoch batches of `epoch` already trained (0 at an epoch boundary)
    steps          {"train": int, "val": int}
    time_elapsed   seconds of training so far, over all previous runs
    best_meter_values
    validation     best validation score so far and the early-stopping count (with `data.val`)
    rng            RNG states now, and at the start of the epoch (to replay the data order)
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from training.engine.options import CheckpointConf
from training.utils.checkpoint_utils import (
    exclude_params_matching_unix_pattern,
    save_checkpoint_atomic,
)
from training.utils.distributed import barrier, unwrap_ddp_if_wrapped

LATEST_NAME = "checkpoint"
# Written beside the latest checkpoint when validation finds a new best score (same content).
BEST_NAME = "checkpoint_best"


class NonFiniteWeightsError(RuntimeError):
    pass


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states, in types that `weights_only` loading accepts."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    python_state = state["python"]
    # weights_only loading turns the inner tuple into a list; random.setstate wants tuples.
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state_for_saving(model: nn.Module, skip_patterns: Sequence[str]) -> dict[str, torch.Tensor]:
    """The model's state dict with plain names, minus `skip_saving_parameters`; all finite."""
    state_dict = unwrap_ddp_if_wrapped(model).state_dict()
    state_dict = exclude_params_matching_unix_pattern(skip_patterns, state_dict)
    bad = [n for n, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to write a checkpoint: {len(bad)} tensors hold NaN/inf (e.g. {bad[:3]}). "
            "The previous checkpoint is kept; lower the learning rate or enable gradient clipping."
        )
    return state_dict


class Checkpointer:
    """Writes and finds the training checkpoints of one run (`checkpoint.save_dir`)."""

    def __init__(self, conf: CheckpointConf, rank: int) -> None:
        self.conf = conf
        self.rank = rank

    @property
    def latest_path(self) -> str:
        return os.path.join(self.conf.save_dir, f"{LATEST_NAME}.pt")

    def names_for_epoch_end(self, next_epoch: int) -> list[str]:
        """`checkpoint`, plus `checkpoint_<n>` when `save_freq`/`save_list` ask to keep epoch n."""
        names = [LATEST_NAME]
        every = self.conf.save_freq
        if (every > 0 and next_epoch % every == 0) or next_epoch in self.conf.save_list:
            names.append(f"{LATEST_NAME}_{next_epoch}")
        return names

    def save(self, payload: Mapping[str, Any], names: Sequence[str] = (LATEST_NAME,)) -> None:
        """Rank 0 writes `payload` under each name; the other ranks wait for it."""
        if self.rank == 0:
            for name in names:
                path = os.path.join(self.conf.save_dir, f"{name}.pt")
                save_checkpoint_atomic(payload, path)
                logging.info(f"saved checkpoint {path} (epoch {payload['epoch']}, step {payload['steps']['train']})")
        barrier()

    def prepare_resume_from(self) -> None:
        """Seeds the run directory with `checkpoint.resume_from` unless the run already has one."""
        source = self.conf.resume_from
        if source is None:
            return
        if not os.path.isfile(source):
            raise FileNotFoundError(
                f"trainer.checkpoint.resume_from is {source!r}, which does not exist; "
                "fix the path or set it to null"
            )
        if self.rank == 0 and not os.path.exists(self.latest_path):
            os.makedirs(self.conf.save_dir, exist_ok=True)
            tmp = self.latest_path + ".copying"
            shutil.copyfile(source, tmp)
            os.replace(tmp, self.latest_path)
        barrier()

    def find_resume_checkpoint(self) -> str | None:
        return self.latest_path if os.path.isfile(self.latest_path) else None

    @staticmethod
    def load(path: str) -> dict[str, Any]:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "optimizer", "epoch", "steps"):
            if key not in checkpoint:
                raise KeyError(
                    f"{path} is not a training checkpoint: it has no {key!r} (keys: {sorted(checkpoint)}). "
                    "To start from model weights, use checkpoint.model_weight_initializer instead."
                )
        return checkpoint
