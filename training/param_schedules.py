"""Schedules of optimizer options per parameter set, and the layer-wise lr decay that refines them.

A schedule entry is a plain dict `{"option": "lr", "scheduler": <callable or None>,
"parameter_names": {names}}`; `training.optimizer.construct_optimizer` builds one list of entries
per option and hands the lists to the configured `param_group_modifiers`.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

SchedulerCfg = dict[str, Any]


class ValueScaler:
    """A schedule multiplied by a constant (e.g. the layer-decay factor of a block)."""

    def __init__(self, scheduler: Callable, mult_val: float) -> None:
        self.scheduler = scheduler
        self.mult_val = mult_val

    def __call__(self, *args: Any, **kwargs: Any) -> float:
        return self.scheduler(*args, **kwargs) * self.mult_val


def _takes_step(schedule: Callable) -> bool:
    return "step" in inspect.signature(schedule.__call__).parameters


def scheduled_value(schedule: Callable, where: float, step: int) -> float:
    """Value of a schedule at progress `where`; schedules that accept `step` get it too."""
    wrapped = getattr(schedule, "scheduler", None)  # a ValueScaler-like wrapper passes both on
    if _takes_step(schedule) or (wrapped is not None and _takes_step(wrapped)):
        return schedule(step=step, where=where)
    return schedule(where)


def _submodule(model: nn.Module, dotted_name: str | None) -> nn.Module:
    module = model
    for attr in (dotted_name.split(".") if dotted_name else ()):
        module = getattr(module, attr)
    return module


def layer_decay_param_modifier(
    scheduler_cfgs: list[list[SchedulerCfg]],
    model: nn.Module,
    layer_decay_value: float,
    layer_decay_min: float | None = None,
    apply_to: str | None = None,
    overrides: Sequence[Mapping[str, Any]] = (),
) -> list[list[SchedulerCfg]]:
    """Split every lr schedule by depth: block i of the decayed module learns `decay^(L+1-i)` as fast.

    Args:
        scheduler_cfgs: the schedule entries, one list per option.
        model: the model; the module at `apply_to` must define `get_num_layers()` and
            `get_layer_id(param_name)` (Hiera does: 0 for the stem, i + 1 for block i).
        layer_decay_value: per-layer factor, e.g. 0.9.
        layer_decay_min: floor of the factors.
        apply_to: dotted path of the decayed module (e.g. `image_encoder.trunk`); parameters outside
            it keep factor 1.
        overrides: `[{pattern, value}]`: parameters of the decayed module matching `pattern` (glob)
            get the factor `value` instead, in a group of their own.
    Returns:
        The entries with each lr entry replaced by one entry per layer, in a stable order (sorted
        names), so that optimizer state dicts line up across restarts.
    """
    decayed = _submodule(model, apply_to)
    for method in ("get_num_layers", "get_layer_id"):
        if not callable(getattr(decayed, method, None)):
            raise ValueError(f"layer decay needs {type(decayed).__name__}.{method}(); apply_to={apply_to!r} names the wrong module")
    top = decayed.get_num_layers() + 1
    factors = [layer_decay_value ** (top - layer) for layer in range(top + 1)]
    if layer_decay_min is not None:
        factors = [max(factor, layer_decay_min) for factor in factors]
    prefix = apply_to or ""

    result = []
    for option_cfgs in scheduler_cfgs:
        split: list[SchedulerCfg] = []
        for cfg in option_cfgs:
            if cfg["option"] != "lr" or cfg.get("scheduler") is None:
                split.append(cfg)
                continue
            by_layer: dict[int | str, SchedulerCfg] = {}
            for name in sorted(cfg["parameter_names"]):
                layer, factor = _layer_and_factor(name, decayed, prefix, top, factors, overrides)
                if layer not in by_layer:
                    by_layer[layer] = {"option": "lr", "scheduler": ValueScaler(cfg["scheduler"], factor), "parameter_names": set()}
                by_layer[layer]["parameter_names"].add(name)
            split.extend(by_layer.values())
        result.append(split)
    return result


def _layer_and_factor(
    name: str, decayed: nn.Module, prefix: str, top: int, factors: list[float], overrides: Sequence[Mapping[str, Any]]
) -> tuple[int | str, float]:
    """The group key (layer id or override pattern) and lr factor of one parameter."""
    if not name.startswith(prefix):
        return top, factors[top]
    for override in overrides:
        if fnmatch.fnmatchcase(name, override["pattern"]):
            return override["pattern"], float(override["value"])
    layer = decayed.get_layer_id(name)
    return layer, factors[layer]
