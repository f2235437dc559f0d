"""Starting the trainer's processes: in-process, spawned local ranks, under torchrun, or on SLURM.

Every process receives the resolved config as a plain container, registers the official
resolvers, builds `cfg.trainer` and runs it. The rank layout is passed the way torchrun does it
(MASTER_ADDR/MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE), so the trainer has one code path.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from typing import Any

import submitit
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from training.engine.config import ConfigError
from training.utils.distributed import destroy_process_group, find_free_port
from training.utils.train_utils import register_omegaconf_resolvers

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_torchrun() -> bool:
    """True when a launcher (torchrun, SLURM via us) already set this process's rank."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def build_trainer(cfg: DictConfig) -> Any:
    """`cfg.trainer` instantiated; a user error deep inside (a batch larger than the dataset, a bad
    keyword) becomes a ConfigError carrying its own message instead of nested Hydra wrappers."""
    try:
        return instantiate(cfg.trainer, _recursive_=False)
    except InstantiationException as exc:
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, (ValueError, TypeError, FileNotFoundError)):
            raise ConfigError(f"cannot build the trainer: {root}") from exc
        raise


def run_trainer(cfg: DictConfig | dict) -> None:
    """Builds and runs `cfg.trainer` in this process (the rank comes from the environment)."""
    register_omegaconf_resolvers()
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    trainer = build_trainer(cfg)
    try:
        trainer.run()
    finally:
        destroy_process_group()


def _set_rank_environment(*, rank: int, local_rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
    )


def _spawned_rank(local_rank: int, master_port: int, cfg: dict, world_size: int) -> None:
    _set_rank_environment(
        rank=local_rank, local_rank=local_rank, world_size=world_size, master_addr="127.0.0.1", master_port=master_port
    )
    try:
        run_trainer(cfg)
    except ConfigError as exc:
        # One line from rank 0, not a traceback per rank; the parent reports the exit code.
        if local_rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def launch_local(cfg: DictConfig, num_processes: int) -> None:
    """Runs the trainer on this machine: as the given torchrun rank, in-process, or spawned."""
    container = OmegaConf.to_container(cfg, resolve=False)
    if under_torchrun():
        run_trainer(container)
        return
    port = find_free_port()
    if num_processes == 1:
        # In-process, so debuggers and breakpoints work.
        saved = {name: os.environ.get(name) for name in (*TORCHRUN_VARIABLES, "MASTER_ADDR", "MASTER_PORT")}
        _set_rank_environment(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=port)
        try:
            run_trainer(container)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        return
    # "spawn": CUDA cannot be used in forked children.
    torch.multiprocessing.start_processes(
        _spawned_rank, args=(port, container, num_processes), nprocs=num_processes, start_method="spawn"
    )


class SubmititRunner(submitit.helpers.Checkpointable):
    """The callable submitit runs on every task; requeues itself on preemption or timeout."""

    def __init__(self, port: int, cfg: dict) -> None:
        self.port = port
        self.cfg = cfg
        self.trainer: Any = None

    def __call__(self) -> None:
        job_env = submitit.JobEnvironment()
        _set_rank_environment(
            rank=job_env.global_rank,
            local_rank=job_env.local_rank,
            world_size=job_env.num_tasks,
            # One node: loopback, which works even where the hostname does not resolve.
            master_addr=job_env.hostnames[0] if job_env.num_nodes > 1 else "127.0.0.1",
            master_port=self.port,
        )
        # submitit starts a fresh interpreter; the job's PYTHONPATH must reach sys.path too.
        for entry in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
            if entry and entry not in sys.path:
                sys.path.insert(0, entry)
        register_omegaconf_resolvers()
        self.trainer = instantiate(OmegaConf.create(self.cfg).trainer, _recursive_=False)
        try:
            self.trainer.run()
        finally:
            destroy_process_group()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the preemption/timeout signal (global rank 0): save, then requeue."""
        if self.trainer is not None and not self.trainer.snapshot_for_preemption():
            logging.warning("preempted during an optimizer update; resuming from the last regular checkpoint")
        return submitit.helpers.DelayedSubmission(SubmititRunner(self.port, self.cfg))

    def __getstate__(self) -> dict:
        return {"port": self.port, "cfg": self.cfg, "trainer": None}


def submitit_job_parameters(cfg: DictConfig, job_name: str) -> dict[str, Any]:
    """`executor.update_parameters` keywords from the official `submitit:` and `launcher:` keys."""
    conf, launcher = cfg.submitit, cfg.launcher
    on_gpu = cfg.trainer.get("accelerator", "cuda") == "cuda"
    tasks_per_node = launcher.gpus_per_node if on_gpu else launcher.get("cpu_processes", 1)
    extra: dict[str, Any] = {}
    if conf.get("exclude_nodes"):
        extra["exclude"] = " ".join(conf.exclude_nodes)
    include = conf.get("include_nodes")
    if include:
        if len(include) < launcher.num_nodes:
            raise ValueError(
                f"submitit.include_nodes lists {len(include)} nodes but launcher.num_nodes is {launcher.num_nodes}"
            )
        extra["nodelist"] = " ".join(include)
    for key in ("account", "qos"):
        if conf.get(key) is not None:
            extra[key] = conf[key]
    params: dict[str, Any] = {
        "timeout_min": int(60 * conf.get("timeout_hour", 24)),
        "name": conf.get("name") or job_name,
        "slurm_partition": conf.get("partition"),
        "gpus_per_node": launcher.gpus_per_node if on_gpu else 0,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": conf.get("cpus_per_task", 10),
        "nodes": launcher.num_nodes,
        "slurm_additional_parameters": extra,
    }
    if conf.get("mem_gb") is not None:
        params["mem_gb"] = conf.mem_gb
    elif conf.get("mem") is not None:
        params["slurm_mem"] = conf.mem
    if conf.get("constraints") is not None:
        params["slurm_constraint"] = conf.constraints
    if conf.get("comment") is not None:
        params["slurm_comment"] = conf.comment
    cpu_bind = (conf.get("srun_args") or {}).get("cpu_bind")
    if cpu_bind is not None:
        params["slurm_srun_args"] = ["--cpu-bind", cpu_bind]
    return params


def launch_on_cluster(cfg: DictConfig, job_name: str) -> submitit.Job:
    """Submits the run through submitit (`submitit.cluster`: null = SLURM when present, or 'local')."""
    folder = os.path.join(cfg.launcher.experiment_log_dir, "submitit_logs")
    executor = submitit.AutoExecutor(folder=folder, cluster=cfg.submitit.get("cluster"))
    params = submitit_job_parameters(cfg, job_name)
    if executor.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        logging.warning(f"no SLURM found; submitit runs the job with its {executor.cluster!r} executor")
    executor.update_parameters(**params)
    low, high = cfg.submitit.get("port_range", [10000, 65000])
    runner = SubmititRunner(random.randint(low, high), OmegaConf.to_container(cfg, resolve=False))
    job = executor.submit(runner)
    print(f"submitted job {job.job_id}; logs in {folder}")
    return job
