"""The SLURM path through submitit's local executor: submit, preempt mid-run, requeue, resume.

No SLURM here; the local executor runs the same `SubmititRunner` in a child process and delivers
the preemption signal (USR2) the way SLURM does.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.test_trainer_engine import run_in_process
from tests.trainer_fakes import full_config, trainer_config
from training.engine.launch import launch_on_cluster

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def task_pid(submitit_folder: Path) -> int:
    """The pid of the job's (single) task process, found by its command line."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in command and str(submitit_folder) in command:
            return int(entry.name)
    raise AssertionError(f"no submitit task running for {submitit_folder}")


def test_preempted_job_requeues_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Same thread count as the job's process, so float reductions run in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = run_in_process(trainer_config(str(tmp_path / "straight")), monkeypatch).model.state_dict()
    finally:
        torch.set_num_threads(threads)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)

    stall = tmp_path / "stall"
    stall.touch()
    run_dir = tmp_path / "cluster"
    config = full_config(str(run_dir))
    config["trainer"]["data"]["train"].update(stall_file=str(stall), stall_after=6)  # freeze after step 3
    config["submitit"].update(use_cluster=True, cluster="local", timeout_hour=1)
    job = launch_on_cluster(OmegaConf.create(config), "fake_run")

    log = run_dir / "logs" / "log.txt"
    wait_for(lambda: log.exists() and "step 3/4" in log.read_text(), 180, "three training steps")
    time.sleep(0.5)
    # SLURM signals every task of the job before preempting it; the local executor's controller
    # does not forward this signal, so send it to the task directly.
    os.kill(task_pid(run_dir / "submitit_logs"), signal.SIGUSR2)
    checkpoint = run_dir / "checkpoints" / "checkpoint.pt"
    wait_for(checkpoint.exists, 60, "the preemption checkpoint")
    stall.unlink()
    job.result()  # raises if the job failed

    text = log.read_text()
    assert "preemption: saved" in text and "resumed from" in text
    state = torch.load(checkpoint, weights_only=True)
    assert state["steps"]["train"] == 8
    for name, value in straight.items():
        assert torch.equal(state["model"][name], value), name
