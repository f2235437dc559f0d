"""Checks a composed training config before any process starts.

Each problem becomes one `ConfigError` line that names the key (as the user wrote it, e.g.
`dataset.img_folder`), the file, and the fix — instead of a Hydra stack trace minutes later.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from sam2.modeling.sam2_base import SAM2Base
from sam2.modeling.tracking.options import field_owners
from training.engine.config import ConfigError, resolve_config

# Keys whose values are files or folders that must exist, and what they are.
DATA_PATH_KEYS = {"img_folder": "image folder", "gt_folder": "mask folder", "file_list_txt": "file list"}
OPTIONAL_NULL_KEYS = {"file_list_txt"}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_INTERPOLATION = re.compile(r"^\$\{([\w.\[\]]+)\}$")
_INTERPOLATION_IN_TEXT = re.compile(r"\$\{([\w.\[\]]+)\}")


def _walk(node: Any, raw: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, resolved value, value as written) for every node of the tree."""
    yield path, node, raw
    if isinstance(node, DictConfig):
        for key in node.keys():
            raw_child = raw.get(key) if isinstance(raw, dict) else None
            yield from _walk(node[key], raw_child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for index, item in enumerate(node):
            raw_child = raw[index] if isinstance(raw, list) and index < len(raw) else None
            yield from _walk(item, raw_child, f"{path}[{index}]")


def _user_key(path: str, raw: Any) -> str:
    """The key the user edits: `dataset.img_folder` when the value was `${dataset.img_folder}`."""
    if isinstance(raw, str):
        match = _INTERPOLATION.match(raw.strip())
        if match:
            return match.group(1)
        if "${" in raw:
            return f"{path} (= {raw})"
    return path


def _suggest(unknown: list[str], accepted: set[str]) -> str:
    """'did you mean ...' for the first unknown key, or the accepted keys when few."""
    close = difflib.get_close_matches(unknown[0], sorted(accepted), n=3)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    names = sorted(accepted)
    return f"accepted keys: {names if len(names) <= 20 else names[:20] + ['...']}"


def accepted_keywords(obj: Any) -> set[str] | None:
    """The keyword arguments `obj(...)` accepts, or None when it takes arbitrary ones.

    A class whose `__init__` forwards `**kwargs` to its base (SAM2Train -> SAM2Base) accepts the
    union of the keywords along that chain.
    """
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    owners = [k for k in obj.__mro__ if "__init__" in k.__dict__] if inspect.isclass(obj) else [obj]
    accepted: set[str] = set()
    for owner in owners:
        function = owner.__dict__["__init__"] if inspect.isclass(owner) else owner
        try:
            params = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return None
        accepted |= {name for name, p in params.items() if p.kind in named and name != "self"}
        if owner is SAM2Base:
            # SAM2Base takes its ~40 official flags as **options and sorts them into groups.
            return accepted | set(field_owners())
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return accepted
    return None


def check_targets(resolved: DictConfig, raw: dict, source: Path) -> None:
    """Every `_target_` imports, and every key under it is a keyword its callable accepts."""
    for path, node, _ in _walk(resolved, raw, ""):
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        target = node["_target_"]
        try:
            obj = get_object(target)
        except Exception as exc:  # noqa: BLE001 - any import failure is the user's unknown target
            raise ConfigError(
                f"{source}: {path}._target_ is {target!r}, which cannot be imported ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); check the dotted path"
            ) from None
        accepted = accepted_keywords(obj)
        if accepted is None:
            continue
        unknown = sorted(str(k) for k in node.keys() if k not in HYDRA_KEYS and k not in accepted)
        if unknown:
            raise ConfigError(f"{source}: {path} has key(s) {unknown} that {target} does not accept; {_suggest(unknown, accepted)}")


def check_data_paths(resolved: DictConfig, raw: dict, source: Path) -> None:
    """Dataset folders and file lists named under `trainer.data` exist."""
    data = resolved.get("trainer", {}).get("data")
    if data is None:
        return
    raw_data = raw.get("trainer", {}).get("data", {})
    for path, value, raw_value in _walk(data, raw_data, "trainer.data"):
        key = path.rsplit(".", 1)[-1]
        if key not in DATA_PATH_KEYS:
            continue
        user_key = _user_key(path, raw_value)
        if value is None:
            if key in OPTIONAL_NULL_KEYS:
                continue
            raise ConfigError(
                f"{source}: {user_key} is not set; give the {DATA_PATH_KEYS[key]} on the command line, "
                f"e.g. {user_key}=/path/to/data"
            )
        if not os.path.exists(str(value)):
            raise ConfigError(
                f"{source}: {user_key} is {value!r}, which does not exist (cwd {os.getcwd()}); "
                f"fix the {DATA_PATH_KEYS[key]} path, e.g. {user_key}=/path/to/data"
            )


def check_checkpoints(resolved: DictConfig, raw: dict, source: Path, resuming: bool) -> None:
    """`resume_from` and the initial weights (unless the run resumes and will not read them) exist."""
    checkpoint = resolved.get("trainer", {}).get("checkpoint") or {}
    raw_checkpoint = raw.get("trainer", {}).get("checkpoint") or {}
    resume_from = checkpoint.get("resume_from")
    if resume_from is not None and not os.path.isfile(str(resume_from)):
        key = _user_key("trainer.checkpoint.resume_from", raw_checkpoint.get("resume_from"))
        raise ConfigError(f"{source}: {key} is {resume_from!r}, which does not exist; fix the path or set it to null")
    if resuming and not checkpoint.get("initialize_after_preemption"):
        return
    initializer = checkpoint.get("model_weight_initializer")
    if initializer is None:
        return
    raw_init = raw_checkpoint.get("model_weight_initializer") or {}
    base = "trainer.checkpoint.model_weight_initializer"
    for path, value, raw_value in _walk(initializer, raw_init, base):
        if path.endswith(".checkpoint_path") and value is not None and not os.path.isfile(str(value)):
            key = _user_key(path, raw_value)
            settable = _INTERPOLATION_IN_TEXT.findall(str(raw_value))[:1] or [key]
            raise ConfigError(
                f"{source}: {key} is {value!r}, which does not exist; put the SAM 2.1 weights there, "
                f"or override {settable[0]}"
            )


def validate_training_config(cfg: DictConfig, source: Path, *, resuming: bool = False) -> DictConfig:
    """Resolves and checks `cfg`; returns the resolved config or raises one ConfigError."""
    for section in ("trainer", "launcher"):
        if section not in cfg:
            raise ConfigError(f"{source}: no '{section}' section; is this a training config (see sam2.1_training/)?")
    if "_target_" not in cfg.trainer:
        raise ConfigError(f"{source}: trainer._target_ is missing; use training.trainer.Trainer")
    resolved = resolve_config(cfg, source)
    raw = OmegaConf.to_container(cfg, resolve=False)
    check_targets(resolved, raw, source)
    check_data_paths(resolved, raw, source)
    check_checkpoints(resolved, raw, source, resuming)
    return resolved
