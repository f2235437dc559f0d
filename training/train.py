"""Fine-tune SAM 2: `python training/train.py -c <config> [options] [key=value ...]`.

    python training/train.py -c sam2.1_training/custom_finetune --use-cluster 0 --num-gpus 4
    python training/train.py -c sam2.1_training/quickstart --num-gpus 0 scratch.base_lr=1e-5
    python -m training.train -c my_run.yaml --print-config

Trailing `key=value` arguments are Hydra overrides and win over the config, as do the flags.
The run writes to `sam2_logs/<config name>/` (or `launcher.experiment_log_dir`) and resumes from
its `checkpoints/checkpoint.pt` when started again.
"""

from __future__ import annotations

import os
import sys

# `python training/train.py` puts training/ first on sys.path, where its sub-packages (dataset,
# utils, model) would shadow same-named top-level modules; the repository root belongs there.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.multiprocessing  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from training.dataset.checks import DatasetCheckFailed, check_config_datasets  # noqa: E402
from training.engine.config import (  # noqa: E402
    ConfigError,
    compose_config,
    default_run_dir,
    resolve_config,
    write_run_configs,
)
from training.engine.launch import launch_local, launch_on_cluster, under_torchrun  # noqa: E402
from training.engine.validate import validate_training_config  # noqa: E402
from training.utils.distributed import cuda_device_count  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="training/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-c", "--config", required=True, help="config name (e.g. sam2.1_training/custom_finetune) or YAML path")
    parser.add_argument("--use-cluster", type=int, choices=(0, 1), default=None, help="1: submit to SLURM via submitit")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs per node; 0 trains on CPU")
    parser.add_argument("--num-nodes", type=int, default=None, help="nodes (SLURM)")
    parser.add_argument("--cpu-processes", type=int, default=None, help="ranks to run on CPU (gloo); default 1")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None, help="SLURM account")
    parser.add_argument("--qos", default=None, help="SLURM QOS")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. scratch.base_lr=1e-5")
    return parser


def apply_command_line(cfg: DictConfig, args: argparse.Namespace, config_path: Path) -> int:
    """Writes the flags into `cfg` (they win over the file); returns the local process count."""
    launcher, submitit_conf = cfg.launcher, cfg.setdefault("submitit", {})
    if launcher.get("experiment_log_dir") is None:
        launcher.experiment_log_dir = default_run_dir(config_path)
    if args.num_nodes is not None:
        launcher.num_nodes = args.num_nodes
    if args.use_cluster is not None:
        submitit_conf.use_cluster = bool(args.use_cluster)
    for key in ("partition", "account", "qos"):
        if getattr(args, key) is not None:
            submitit_conf[key] = getattr(args, key)
    if args.cpu_processes is not None:
        launcher.cpu_processes = args.cpu_processes
    use_cluster = bool(submitit_conf.get("use_cluster", False))
    if not use_cluster:
        launcher.num_nodes = 1
    visible = cuda_device_count()
    wants_gpu = cfg.trainer.get("accelerator", "cuda") == "cuda"
    num_gpus = args.num_gpus
    if num_gpus is None:
        num_gpus = int(launcher.get("gpus_per_node", 1)) if wants_gpu and (visible > 0 or use_cluster) else 0
    if num_gpus < 0:
        raise ConfigError(f"--num-gpus is {num_gpus}; use 0 for CPU or the number of GPUs per node")
    if num_gpus > visible and not use_cluster and not under_torchrun():
        raise ConfigError(
            f"--num-gpus {num_gpus} asks for {num_gpus} GPUs but {visible} are visible on this machine; "
            f"use --num-gpus {visible} (0 trains on CPU)"
        )
    if num_gpus == 0:
        cfg.trainer.accelerator = "cpu"
        distributed = cfg.trainer.setdefault("distributed", {})
        if distributed.get("backend") in (None, "nccl"):
            distributed.backend = "gloo"
        launcher.setdefault("cpu_processes", 1)
        launcher.gpus_per_node = int(launcher.cpu_processes)
        return int(launcher.cpu_processes)
    launcher.gpus_per_node = num_gpus
    return num_gpus


def is_resuming(resolved: DictConfig) -> bool:
    save_dir = resolved.trainer.get("checkpoint", {}).get("save_dir")
    return bool(save_dir) and os.path.isfile(os.path.join(save_dir, "checkpoint.pt"))


def check_datasets(resolved: DictConfig) -> str:
    """Fast check of every dataset under `trainer.data` (raises DatasetCheckFailed); a one-line verdict."""
    data = resolved.trainer.get("data")
    if data is None:
        return "dataset check: no datasets configured"
    reports = check_config_datasets(OmegaConf.to_container(data, resolve=True))
    # An image folder with masks but no images passes the checker with warnings only; it still
    # has nothing to train on.
    empty = [r for r in reports if r.num_videos == 0]
    if empty:
        raise DatasetCheckFailed(
            "the training data cannot be used: no images or videos found\n" + "\n".join(r.summary() for r in empty)
            + "\nrun python -m training.tools.check_dataset for the full check"
        )
    warnings = sum(len(r.problems) for r in reports)
    line = f"dataset check: {len(reports)} dataset(s) usable"
    if warnings:
        line += f", {warnings} warning(s) (python -m training.tools.check_dataset lists them)"
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, path = compose_config(args.config, args.overrides)
        if "launcher" not in cfg or "trainer" not in cfg:
            raise ConfigError(f"{path}: not a training config (it needs 'trainer' and 'launcher' sections)")
        num_processes = apply_command_line(cfg, args, path)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        resolved = validate_training_config(cfg, path, resuming=is_resuming(resolve_config(cfg, path)))
        # Before any process or model exists: bad data should cost seconds, not a GPU allocation.
        verdict = check_datasets(resolved)
    except (ConfigError, DatasetCheckFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(verdict, flush=True)
        write_run_configs(cfg, cfg.launcher.experiment_log_dir)
        print(f"run directory: {cfg.launcher.experiment_log_dir}", flush=True)
    if cfg.submitit.get("use_cluster", False):
        launch_on_cluster(cfg, path.stem)
        return 0
    try:
        launch_local(cfg, num_processes)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except torch.multiprocessing.ProcessExitedException as exc:  # a rank exited; it said why
        return exc.exit_code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
