"""Model weight files: `{"model": state_dict}`, loaded strictly, with errors that say what is wrong.

A checkpoint that does not fit the model names the config that was used, the missing and
unexpected keys (the first few and their counts), mismatched shapes, and, when the weights'
shapes tell, which official model the checkpoint probably belongs to.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import torch
from torch import Tensor, nn

# Hiera trunks of the official sizes: (patch-embedding width, number of blocks) -> size suffix.
_TRUNK_SIGNATURES = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}
_PATCH_EMBED_KEY = "image_encoder.trunk.patch_embed.proj.weight"
_BLOCK_KEY = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")
_SHOWN_KEYS = 5


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


def read_model_state_dict(ckpt_path: str | os.PathLike) -> dict[str, Tensor]:
    """The `"model"` state dict of a checkpoint file, read on the CPU with `weights_only=True`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is corrupt, truncated, not a PyTorch file, or has no `"model"`.
    """
    path = os.fspath(ckpt_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist (working directory {os.getcwd()!r})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path!r} ({os.path.getsize(path)} bytes): {type(exc).__name__}: "
            f"{str(exc)[:300]}. The file is corrupt or truncated (an interrupted download or copy?) "
            "or not a PyTorch checkpoint; download or copy it again"
        ) from exc
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(
            f"checkpoint {path!r} has no 'model' entry (found {found}); SAM 2 weight files are "
            "{'model': state_dict}, as written by the official release and by our trainer"
        )
    return checkpoint["model"]


def guess_model_config(state_dict: Mapping[str, Tensor]) -> str | None:
    """The official config whose model has these weights' trunk and version, e.g. `sam2.1_hiera_b+`.

    The trunk size comes from the patch-embedding width and the number of Hiera blocks; SAM 2.1
    is told from SAM 2 by its `no_obj_embed_spatial` parameter. None when the shapes match no
    official model.
    """
    patch_embed = state_dict.get(_PATCH_EMBED_KEY)
    if patch_embed is None:
        return None
    blocks = {int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key))}
    size = _TRUNK_SIGNATURES.get((patch_embed.shape[0], len(blocks)))
    if size is None:
        return None
    version = "sam2.1" if "no_obj_embed_spatial" in state_dict else "sam2"
    return f"{version}_hiera_{size}"


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def describe_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor], *, config_name: str) -> str | None:
    """Why `state_dict` does not load strictly into `model`, or None when it does."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or wrong_shape):
        return None
    lines = [f"checkpoint does not fit the model built from config {config_name!r}:"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if wrong_shape:
        lines.append(f"  {len(wrong_shape)} shape mismatch(es) (checkpoint vs model): {_first(wrong_shape)}")
    if unexpected and all(k.startswith("module.") for k in state_dict):
        lines.append("  the keys carry a DDP 'module.' prefix: save model.module.state_dict() instead")
    guess, ours = guess_model_config(state_dict), guess_model_config(expected)
    if guess is not None and guess != ours:
        lines.append(f"  the checkpoint's shapes are those of {guess!r}: build with config {guess!r}")
    return "\n".join(lines)


def load_state_dict_strictly(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, config_name: str, source: str | os.PathLike
) -> None:
    """Load `state_dict` (read from the file `source`) into `model` strictly.

    Raises:
        CheckpointError: with `describe_mismatch`'s explanation when the keys or shapes differ.
    """
    problem = describe_mismatch(model, state_dict, config_name=config_name)
    if problem is not None:
        raise CheckpointError(f"{problem}\n  (checkpoint file: {os.fspath(source)!r})")
    model.load_state_dict(state_dict, strict=True)


def load_model_weights(model: nn.Module, ckpt_path: str | os.PathLike, *, config_name: str) -> None:
    """Load the `"model"` weights of the file `ckpt_path` into `model`, strictly.

    Raises:
        FileNotFoundError, CheckpointError: see `read_model_state_dict` and `describe_mismatch`.
    """
    state_dict = read_model_state_dict(ckpt_path)
    load_state_dict_strictly(model, state_dict, config_name=config_name, source=ckpt_path)


def state_dict_signature(module: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """`[(key, shape, dtype)]` of a module's state dict, in order (compares models cheaply)."""
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items()]
