"""The training loop on tiny fakes: checkpoints, resume after SIGKILL, NaN losses, accumulation,
and real multi-process runs (spawned by train.py and under torchrun) with gloo on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra.errors import InstantiationException

from tests.trainer_fakes import full_config, trainer_config
from training.engine.step import NonFiniteLossError
from training.utils.distributed import destroy_process_group

REPO = Path(__file__).resolve().parent.parent


def run_in_process(trainer_cfg: dict, monkeypatch: pytest.MonkeyPatch, during_run=contextlib.nullcontext):
    """Builds and runs a Trainer in this process as a 1-rank job, inside `during_run(trainer)`; returns it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from training.utils.distributed import find_free_port

    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(find_free_port()))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        trainer = instantiate(OmegaConf.create(trainer_cfg), _recursive_=False)
        with during_run(trainer):
            trainer.run()
    finally:
        destroy_process_group()
        # The trainer points the root logger at its run directory; give pytest its handlers back.
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    return trainer


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_cli(config: Path, *extra: str, wait: bool = True, env: dict | None = None) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "training/train.py", "-c", str(config), "--num-gpus", "0", *extra]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        full_env.pop(name, None)
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "checkpoint.pt", weights_only=True)["model"]


def test_training_writes_a_complete_checkpoint_and_logs(tmp_path, monkeypatch):
    trainer = run_in_process(trainer_config(str(tmp_path), max_epochs=3), monkeypatch)

    checkpoint = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "loss", "epoch", "steps", "time_elapsed", "rng"} <= set(checkpoint)
    assert checkpoint["epoch"] == 3 and checkpoint["steps"]["train"] == 12 and checkpoint["batch_in_epoch"] == 0
    assert checkpoint["time_elapsed"] > 0
    # One process trains the plain model: no DDP buckets holding gradients through the forward.
    assert not isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    assert set(checkpoint["model"]) == set(trainer.model.state_dict())
    assert not any(name.startswith("module.") for name in checkpoint["model"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"]) | set(events.Tags()["tensors"])  # new_style scalars are tensors
    expected = {"Losses/train_loss", "Losses/train_loss_mse", "Optim/lr_group0", "Optim/grad_norm"}
    assert expected | {"Step_Stats/train/samples_per_s", "Step_Stats/train/data_time_share"} <= tags, tags
    log = (tmp_path / "logs" / "log.txt").read_text()
    assert "SAM 2 training" in log and "tensorboard --logdir" in log and "samples/s" in log
    epochs = [json.loads(line) for line in (tmp_path / "logs" / "train_stats.json").read_text().splitlines()]
    assert epochs[-1]["Losses/train_loss"] < 0.8 * epochs[0]["Losses/train_loss"]


@pytest.mark.parametrize("fused", [True, False], ids=["skipped_on_device", "skipped_on_host"])
def test_nonfinite_losses_skip_steps_then_stop_the_run(tmp_path, monkeypatch, fused):
    config = trainer_config(str(tmp_path), max_epochs=1)
    config["loss"]["all"]["nan_on_calls"] = [2]
    config["optim"]["optimizer"].update(fused=fused, foreach=not fused)
    trainer = run_in_process(config, monkeypatch)
    assert trainer.train_step.skips_on_device is fused
    # The epoch's averages leave the skipped batch out.
    (epoch,) = [json.loads(line) for line in (tmp_path / "logs" / "train_stats.json").read_text().splitlines()]
    assert 0 < epoch["Losses/train_loss"] < float("inf"), epoch
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert "non-finite loss" in (tmp_path / "logs" / "log.txt").read_text()
    assert "videos [" in (tmp_path / "logs" / "log.txt").read_text()

    config = trainer_config(str(tmp_path / "b"), max_epochs=1)
    config["loss"]["all"]["nan_on_calls"] = [2, 3]
    config["optim"]["optimizer"].update(fused=fused, foreach=not fused)
    config["optim"]["max_nonfinite_steps"] = 2
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        run_in_process(config, monkeypatch)


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path, monkeypatch):
    def run(name: str, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        config = trainer_config(str(tmp_path / name), max_epochs=1)
        config["model"]["dropout"] = 0.0
        config["data"]["train"].update(batch_size=batch_size, shuffle=False, noise=0.0)
        config["optim"]["gradient_accumulation_steps"] = accumulation
        # SGD: Adam would turn float-rounding-sized gradients into full-size steps of either sign.
        config["optim"]["optimizer"] = {"_target_": "torch.optim.SGD", "lr": 0.1}
        return run_in_process(config, monkeypatch).model.state_dict()

    big, accumulated = run("big", 2, 1), run("acc", 1, 2)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-6)


def test_resume_from_seeds_a_new_run_directory(tmp_path, monkeypatch):
    first = run_in_process(trainer_config(str(tmp_path / "first"), max_epochs=1), monkeypatch)
    source = tmp_path / "first" / "checkpoints" / "checkpoint.pt"
    config = trainer_config(str(tmp_path / "second"), max_epochs=2)
    config["checkpoint"]["resume_from"] = str(source)
    second = run_in_process(config, monkeypatch)
    assert second.resumed_from == str(tmp_path / "second" / "checkpoints" / "checkpoint.pt")
    assert second.steps["train"] == 8 and first.steps["train"] == 4
    assert "resumed from" in (tmp_path / "second" / "logs" / "log.txt").read_text()

    missing = trainer_config(str(tmp_path / "third"))
    missing["checkpoint"]["resume_from"] = str(tmp_path / "nowhere.pt")
    with pytest.raises(InstantiationException, match="resume_from is .*nowhere.pt"):
        run_in_process(missing, monkeypatch)


@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_mixed_precision_runs_and_saves_the_scaler_for_float16(tmp_path, monkeypatch, amp_dtype):
    config = trainer_config(str(tmp_path), max_epochs=1)
    config["optim"]["amp"] = {"enabled": True, "amp_dtype": amp_dtype, "enabled_on_cpu": True}
    trainer = run_in_process(config, monkeypatch)
    assert trainer.autocast_dtype == getattr(torch, amp_dtype)
    checkpoint = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert ("scaler" in checkpoint) == (amp_dtype == "float16")
    assert all(value.dtype == torch.float32 for value in checkpoint["model"].values() if value.is_floating_point())


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    def config_for(name: str, stall_file: str | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        config = full_config(str(folder / "run"))
        config["trainer"]["checkpoint"]["save_every_steps"] = 3
        config["trainer"]["data"]["train"].update(stall_file=stall_file, stall_after=6)
        return write_config(folder, config)

    train_cli(config_for("straight", None))

    stall = tmp_path / "stall"
    stall.touch()
    killed_config = config_for("killed", str(stall))
    process = train_cli(killed_config, wait=False)
    checkpoint = tmp_path / "killed" / "run" / "checkpoints" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert checkpoint.exists(), process.communicate()[0].decode()[-3000:]
    time.sleep(0.5)  # the run is now frozen in data loading, past its step-3 checkpoint
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    state = torch.load(checkpoint, weights_only=True)
    assert state["steps"]["train"] == 3 and state["batch_in_epoch"] == 3
    stall.unlink()

    resumed = train_cli(killed_config)
    assert "resumed from" in resumed.stdout
    straight, after_resume = final_model(tmp_path / "straight" / "run"), final_model(tmp_path / "killed" / "run")
    for name in straight:
        assert torch.equal(straight[name], after_resume[name]), name


def checksums(run_dir: Path) -> list[str]:
    logs = sorted((run_dir / "logs").glob("log*.txt"))
    return [re.findall(r"final weights checksum (\S+)", p.read_text())[-1] for p in logs]


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_twice_the_batch(tmp_path):
    def config_for(name: str, batch_size: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        config = full_config(str(folder / "run"), max_epochs=1)
        config["trainer"]["model"]["dropout"] = 0.0
        config["trainer"]["data"]["train"].update(batch_size=batch_size, shuffle=False, noise=0.0)
        config["trainer"]["optim"]["optimizer"] = {"_target_": "torch.optim.SGD", "lr": 0.1}
        return write_config(folder, config)

    train_cli(config_for("one", 2))
    train_cli(config_for("spawned", 1), "--cpu-processes", "2")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    torchrun += ["training/train.py", "-c", str(config_for("torchrun", 1)), "--num-gpus", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    reference = final_model(tmp_path / "one" / "run")
    for name in ("spawned", "torchrun"):
        run_dir = tmp_path / name / "run"
        ranks = checksums(run_dir)
        assert len(ranks) == 2 and ranks[0] == ranks[1], ranks
        weights = final_model(run_dir)
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_skips_the_update_on_both(tmp_path):
    def run(name: str, nan_on_ranks: list[int] | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        config = full_config(str(folder / "run"), max_epochs=1)
        config["trainer"]["model"]["dropout"] = 0.0
        config["trainer"]["data"]["train"].update(batch_size=1, shuffle=False, noise=0.0)
        config["trainer"]["loss"]["all"].update(nan_on_calls=[2], nan_on_ranks=nan_on_ranks)
        train_cli(write_config(folder, config), "--cpu-processes", "2")
        return folder / "run"

    one, both = run("one", [1]), run("both", None)
    for run_dir in (one, both):
        ranks = checksums(run_dir)
        assert len(ranks) == 2 and ranks[0] == ranks[1], ranks
    reference = final_model(both)
    for key, value in final_model(one).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    assert "rank 0, step 2: non-finite loss on another rank; skipped" in (one / "logs" / "log.txt").read_text()
    assert "rank 1, step 2: non-finite loss {'loss': nan" in (one / "logs" / "log_rank1.txt").read_text()
