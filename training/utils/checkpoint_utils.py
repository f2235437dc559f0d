"""Reading initial weights into a model and writing checkpoints safely.

The config-facing names are the official ones (`load_checkpoint_and_apply_kernels`,
`load_state_dict_into_model`, `CkptExcludeKernel`), so official training configs load weights
through them unchanged:

    model_weight_initializer:
      _partial_: True
      _target_: training.utils.checkpoint_utils.load_state_dict_into_model
      state_dict:
        _target_: training.utils.checkpoint_utils.load_checkpoint_and_apply_kernels
        checkpoint_path: ./checkpoints/sam2.1_hiera_base_plus.pt
        ckpt_state_dict_keys: ['model']
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]


def unix_pattern_to_parameter_names(patterns: Sequence[str], names: Iterable[str]) -> set[str]:
    """The names matching any of the shell-style `patterns`; each pattern must match something."""
    names = list(names)
    selected: set[str] = set()
    for pattern in patterns:
        matches = set(fnmatch.filter(names, pattern))
        if not matches:
            raise KeyError(f"pattern {pattern!r} matches no parameter name (e.g. {names[:3]})")
        selected |= matches
    return selected


def filter_params_matching_unix_pattern(patterns: Sequence[str], state_dict: StateDict) -> StateDict:
    """The entries of `state_dict` whose names match `patterns` (empty when no patterns)."""
    if not patterns:
        return {}
    keep = unix_pattern_to_parameter_names(patterns, state_dict.keys())
    return {name: value for name, value in state_dict.items() if name in keep}


def exclude_params_matching_unix_pattern(patterns: Sequence[str], state_dict: StateDict) -> StateDict:
    """`state_dict` without the entries whose names match `patterns`."""
    if not patterns:
        return state_dict
    drop = unix_pattern_to_parameter_names(patterns, state_dict.keys())
    return {name: value for name, value in state_dict.items() if name not in drop}


def assert_skipped_parameters_are_frozen(model: nn.Module, patterns: Sequence[str]) -> None:
    """Parameters left out of checkpoints (`skip_saving_parameters`) must not be trained."""
    if not patterns:
        return
    skipped = unix_pattern_to_parameter_names(patterns, model.state_dict().keys())
    trainable = sorted(n for n, p in model.named_parameters() if n in skipped and p.requires_grad)
    if trainable:
        raise ValueError(
            f"checkpoint.skip_saving_parameters leaves out trainable parameters {trainable[:5]} "
            f"({len(trainable)} in all): they would be lost on resume. Freeze them or drop the pattern."
        )


@contextlib.contextmanager
def with_check_parameter_frozen(
    model: nn.Module, patterns: Sequence[str], disabled: bool = True
) -> Iterator[None]:
    """Raises if the wrapped code changes a parameter matched by `patterns`.

    Those parameters are not saved, so an initializer that changes them would make a resumed run
    differ from the original one.
    """
    if disabled or not patterns:
        yield
        return

    def snapshot() -> StateDict:
        watched = filter_params_matching_unix_pattern(patterns, model.state_dict())
        return {name: value.detach().clone() for name, value in watched.items()}

    before = snapshot()
    yield
    after = snapshot()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    if changed:
        raise ValueError(
            f"model_weight_initializer changed {changed[:5]}, which checkpoint.skip_saving_parameters "
            "leaves out of checkpoints. Initialise them inside the model, or set "
            "trainer.checkpoint.initialize_after_preemption=true."
        )


class CkptExcludeKernel:
    """Drops the state-dict entries matching `key_pattern` (shell-style patterns)."""

    def __init__(self, key_pattern: Sequence[str]) -> None:
        self.key_pattern = list(key_pattern)

    def __call__(self, state_dict: StateDict) -> StateDict:
        return exclude_params_matching_unix_pattern(self.key_pattern, state_dict)


class CkptIncludeKernel:
    """Keeps only the state-dict entries matching `key_pattern`."""

    def __init__(self, key_pattern: Sequence[str]) -> None:
        self.key_pattern = list(key_pattern)

    def __call__(self, state_dict: StateDict) -> StateDict:
        return filter_params_matching_unix_pattern(self.key_pattern, state_dict)


def load_checkpoint(
    path_list: Sequence[str],
    pick_recursive_keys: Sequence[str] | None = None,
    map_location: str = "cpu",
) -> Any:
    """Loads the first existing file of `path_list`, optionally descending into nested keys."""
    existing = [path for path in path_list if os.path.exists(path)]
    if not existing:
        raise FileNotFoundError(f"none of these checkpoint files exists: {list(path_list)}")
    checkpoint = torch.load(existing[0], map_location=map_location, weights_only=True)
    for key in pick_recursive_keys or ():
        checkpoint = checkpoint[key]
    return checkpoint


def get_state_dict(checkpoint: Any, ckpt_state_dict_keys: Sequence[Any]) -> StateDict:
    """Walks `ckpt_state_dict_keys` into `checkpoint` (e.g. ['model'])."""
    node = checkpoint
    for depth, key in enumerate(ckpt_state_dict_keys):
        present = key in node if isinstance(node, Mapping) else key < len(node)
        if not present:
            where = "".join(f"[{k!r}]" for k in ckpt_state_dict_keys[:depth])
            available = list(node.keys()) if isinstance(node, Mapping) else f"{len(node)} items"
            raise KeyError(f"checkpoint{where} has no key {key!r}; it has {available}")
        node = node[key]
    return node


def load_checkpoint_and_apply_kernels(
    checkpoint_path: str,
    checkpoint_kernels: Sequence[Callable[..., StateDict]] | None = None,
    ckpt_state_dict_keys: Sequence[Any] = ("state_dict",),
    map_location: str = "cpu",
) -> StateDict:
    """The state dict at `ckpt_state_dict_keys` inside `checkpoint_path`, passed through the kernels."""
    if not os.path.exists(checkpoint_path):
        raise FileNotFoundError(
            f"checkpoint {checkpoint_path!r} not found (cwd {os.getcwd()}); fix "
            "checkpoint_path under trainer.checkpoint.model_weight_initializer"
        )
    # CPU first: loading straight to the GPU would hold two copies of the weights there.
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    state_dict = get_state_dict(checkpoint, list(ckpt_state_dict_keys))
    for kernel in checkpoint_kernels or ():
        state_dict = kernel(state_dict=state_dict)
    return state_dict


def describe_key_mismatch(missing: Sequence[str], unexpected: Sequence[str], shown: int = 5) -> str:
    """'N missing keys (a, b, ...); M unexpected keys (...)' for error messages."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys {list(missing[:shown])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {list(unexpected[:shown])}")
    return "; ".join(parts)


def check_load_state_dict_errors(
    missing_keys: Sequence[str],
    unexpected_keys: Sequence[str],
    strict: bool,
    ignore_missing_keys: Sequence[str] | None = None,
    ignore_unexpected_keys: Sequence[str] | None = None,
) -> None:
    """Raises on unexpected keys, and on missing keys when `strict`, after the ignore patterns."""
    if ignore_missing_keys and missing_keys:
        ignored = unix_pattern_to_parameter_names(ignore_missing_keys, missing_keys)
        missing_keys = [key for key in missing_keys if key not in ignored]
    if ignore_unexpected_keys and unexpected_keys:
        ignored = unix_pattern_to_parameter_names(ignore_unexpected_keys, unexpected_keys)
        unexpected_keys = [key for key in unexpected_keys if key not in ignored]
    if not missing_keys and not unexpected_keys:
        return
    message = "state dict does not match the model: " + describe_key_mismatch(missing_keys, unexpected_keys)
    logging.warning(message)
    if unexpected_keys or strict:
        raise KeyError(message)


def load_state_dict_into_model(
    state_dict: StateDict,
    model: nn.Module,
    strict: bool = True,
    ignore_missing_keys: Sequence[str] | None = None,
    ignore_unexpected_keys: Sequence[str] | None = None,
    checkpoint_kernels: Sequence[Callable[..., StateDict]] | None = None,
) -> nn.Module:
    """Loads `state_dict` into `model` in place and returns the model.

    Unexpected keys always raise; missing keys raise when `strict` (after `ignore_missing_keys`).
    """
    # Kernels (key filters, remappings) run in config order, each on the previous one's output.
    state_dict = functools.reduce(lambda sd, kernel: kernel(state_dict=sd), checkpoint_kernels or (), state_dict)
    # Loaded non-strictly so that the report below can apply the ignore patterns and name the keys.
    incompatible = model.load_state_dict(state_dict, strict=False)
    ignore = dict(ignore_missing_keys=ignore_missing_keys, ignore_unexpected_keys=ignore_unexpected_keys)
    check_load_state_dict_errors(*incompatible, strict=strict, **ignore)
    return model


def save_checkpoint_atomic(payload: Mapping[str, Any], path: str) -> None:
    """Writes `payload` with torch.save so that `path` is always either the old or the new file.

    The bytes go to a temporary file in the same folder (a rename is only atomic within one file
    system), are flushed and fsynced, and then renamed over `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    # Persist the rename itself (the directory entry) as well.
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
