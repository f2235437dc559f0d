"""Small helpers shared by the training engine: config resolvers, seeding, ranks, meters, paths."""

from __future__ import annotations

import logging
import math
import os
import random
import re
from typing import Any

import hydra
import numpy as np
import omegaconf
import torch
from omegaconf import OmegaConf


class Phase:
    TRAIN = "train"
    VAL = "val"


def multiply_all(*args: float) -> float:
    """`${times:a,b,...}`: the product of all arguments."""
    return np.prod(np.array(args)).item()


# The resolvers the official configs use (e.g. `${times:${scratch.num_epochs},${scratch.phases_per_epoch}}`).
_RESOLVERS = {
    "get_method": hydra.utils.get_method,
    "get_class": hydra.utils.get_class,
    "add": lambda x, y: x + y,
    "times": multiply_all,
    "divide": lambda x, y: x / y,
    "pow": lambda x, y: x**y,
    "subtract": lambda x, y: x - y,
    "range": lambda x: list(range(x)),
    "int": lambda x: int(x),
    "ceil_int": lambda x: int(math.ceil(x)),
    "merge": lambda *x: OmegaConf.merge(*x),
}


def register_omegaconf_resolvers() -> None:
    """Registers the official OmegaConf resolvers; safe to call again in the same process."""
    for name, resolver in _RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def collect_dict_keys(config: Any) -> list[str]:
    """The `dict_key`s of every collate function named in a dataset config (one per dataset)."""
    keys: list[str] = []
    if "_target_" in config and re.match(r".*collate_fn.*", config["_target_"]):
        keys.append(config["dict_key"])
        return keys
    for value in config.values():
        if isinstance(value, omegaconf.DictConfig):
            keys.extend(collect_dict_keys(value))
        elif isinstance(value, omegaconf.ListConfig):
            for item in value:
                if isinstance(item, omegaconf.DictConfig):
                    keys.extend(collect_dict_keys(item))
    return keys


def get_machine_local_and_dist_rank() -> tuple[int, int]:
    """(LOCAL_RANK, RANK) from the environment the launcher sets; (0, 0) when run unlaunched."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("RANK", 0))


def set_seeds(seed_value: int, max_epochs: int, dist_rank: int) -> int:
    """Seeds python, numpy and torch differently on every rank; returns the seed used.

    The official formula `(seed + rank) * max_epochs` is kept so seeds match the reference trainer.
    """
    seed = (seed_value + dist_rank) * max_epochs
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed


def makedir(dir_path: str) -> bool:
    """Creates `dir_path` (and parents) if missing; returns whether it exists afterwards."""
    try:
        os.makedirs(dir_path, exist_ok=True)
    except OSError as exc:
        logging.warning(f"could not create directory {dir_path}: {exc}")
        return False
    return True


def is_dist_avail_and_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_amp_type(amp_type: str | None = None) -> torch.dtype | None:
    """'bfloat16' / 'float16' -> the torch dtype (None stays None)."""
    if amp_type is None:
        return None
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if amp_type not in dtypes:
        raise ValueError(f"optim.amp.amp_dtype is {amp_type!r}; use one of {sorted(dtypes)}")
    return dtypes[amp_type]


def human_readable_time(time_seconds: float) -> str:
    total = int(time_seconds)
    minutes, seconds = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02}h {minutes:02}m"
    return f"{hours:02}h {minutes:02}m {seconds:02}s"


class AverageMeter:
    """Running value and sample-weighted average of a scalar."""

    def __init__(self, name: str, device: torch.device | None = None, fmt: str = ":f") -> None:
        self.name = name
        self.device = device
        self.fmt = fmt
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self) -> str:
        return ("{name}: {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


class DurationMeter:
    """Wall time of the run, carried over across resumes."""

    def __init__(self, name: str, device: torch.device | None = None, fmt: str = ":f") -> None:
        self.name = name
        self.device = device
        self.fmt = fmt
        self.val = 0.0

    def reset(self) -> None:
        self.val = 0.0

    def update(self, val: float) -> None:
        self.val = val

    def add(self, val: float) -> None:
        self.val += val

    def __str__(self) -> str:
        return f"{self.name}: {human_readable_time(self.val)}"


def get_resume_checkpoint(checkpoint_save_dir: str) -> str | None:
    """`<save_dir>/checkpoint.pt` if it exists, else None."""
    path = os.path.join(checkpoint_save_dir, "checkpoint.pt")
    return path if os.path.isfile(path) else None
