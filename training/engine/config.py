"""A run's config: finding the file, composing it with overrides, checking it, saving it.

`-c` accepts, in this order of lookup:
    a name under sam2/configs/          sam2.1_training/custom_finetune
    the official form                   configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml
    a name under ./configs/ (users')    my_run
    a path to any YAML file             /data/exp/run.yaml
with or without `.yaml`. Configs may pull others in through Hydra `defaults:`; all these folders
are on the search path.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import sam2
from training.utils.train_utils import register_omegaconf_resolvers

SAM2_PACKAGE_DIR = Path(sam2.__file__).resolve().parent
SAM2_CONFIGS_DIR = SAM2_PACKAGE_DIR / "configs"
REPO_ROOT = SAM2_PACKAGE_DIR.parent


class ConfigError(ValueError):
    """A user-facing config problem; the message names the key or file and how to fix it."""


def user_config_dirs() -> list[Path]:
    """The users' `configs/` folders: the working directory's and the repository's."""
    dirs = [Path.cwd() / "configs", REPO_ROOT / "configs"]
    unique: list[Path] = []
    for folder in dirs:
        if folder.resolve() not in [d.resolve() for d in unique]:
            unique.append(folder)
    return unique


def find_config_file(name: str) -> Path:
    """The YAML file that `-c name` means (see the module docstring), or a ConfigError."""
    stem = name[:-5] if name.endswith(".yaml") else name
    candidates = [SAM2_CONFIGS_DIR / f"{stem}.yaml", SAM2_PACKAGE_DIR / f"{stem}.yaml"]
    candidates += [folder / f"{stem}.yaml" for folder in user_config_dirs()]
    candidates += [Path(name), Path(f"{stem}.yaml")]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    shipped = sorted(str(p.relative_to(SAM2_CONFIGS_DIR))[:-5] for p in SAM2_CONFIGS_DIR.glob("sam2.1_training/*.yaml"))
    raise ConfigError(
        f"config {name!r} not found; looked for {', '.join(str(c) for c in candidates[:4])}. "
        f"Shipped training configs: {shipped}; or pass a path to a YAML file."
    )


@contextlib.contextmanager
def _hydra_for(config_dir: Path) -> Iterator[None]:
    """Hydra initialised on `config_dir`; the process's previous Hydra state comes back afterwards."""
    global_hydra = GlobalHydra.instance()
    previous = copy.copy(global_hydra.hydra) if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_dir(str(config_dir), version_base="1.2"):
            yield
    finally:
        GlobalHydra.instance().clear()
        if previous is not None:
            GlobalHydra.instance().initialize(previous)


def compose_config(name: str, overrides: Sequence[str] = ()) -> tuple[DictConfig, Path]:
    """The composed (unresolved) config for `-c name` with command-line `overrides` applied."""
    register_omegaconf_resolvers()
    path = find_config_file(name)
    # sam2.1_training/ is on the path so its `model_size` group works from any config that extends it.
    search = [SAM2_CONFIGS_DIR, SAM2_PACKAGE_DIR, SAM2_CONFIGS_DIR / "sam2.1_training"]
    search += [d for d in user_config_dirs() if d.is_dir()]
    searchpath = "hydra.searchpath=[" + ",".join(f"file://{d}" for d in search) + "]"
    try:
        with _hydra_for(path.parent):
            cfg = compose(config_name=path.stem, overrides=[searchpath, *overrides])
    except (HydraException, OmegaConfBaseException) as exc:
        first_line = str(exc).strip().splitlines()[0].rstrip(".")
        hint = ""
        if "Could not override" in str(exc):
            hint = " Check the spelling against the config (use --print-config), or add the key with a leading '+'."
        raise ConfigError(f"cannot compose config {path}: {first_line}.{hint}") from None
    # Hydra's own `hydra:` node is not part of a training config.
    with contextlib.suppress(Exception):
        OmegaConf.set_struct(cfg, False)
        cfg.pop("hydra", None)
    return cfg, path


def resolve_config(cfg: DictConfig, source: Path | str) -> DictConfig:
    """A resolved copy of `cfg`; an interpolation that fails names the key and the file."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{source}: cannot resolve key '{key}': {str(exc).splitlines()[0]}") from None


def default_run_dir(config_path: Path) -> str:
    return os.path.join(os.getcwd(), "sam2_logs", config_path.stem)


def write_run_configs(cfg: DictConfig, run_dir: str) -> None:
    """`config.yaml` as composed and `config_resolved.yaml` with every interpolation resolved."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg))
    with open(os.path.join(run_dir, "config_resolved.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
