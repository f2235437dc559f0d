"""run_training_docker.sh against a fake `docker` that records its argv (no Docker engine here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "run_training_docker.sh"

FAKE_DOCKER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:2] == ["image", "inspect"]:
    sys.exit(0 if os.environ.get("FAKE_DOCKER_HAS_IMAGE") == "1" else 1)
if args[:1] == ["info"]:
    print(os.environ.get("FAKE_DOCKER_RUNTIMES", '{{"runc":{{"path":"runc"}}}}'))
if args[:1] == ["run"]:
    sys.exit(int(os.environ.get("FAKE_DOCKER_EXIT", "0")))
"""


class Launcher:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        docker = self.bin / "docker"
        docker.write_text(FAKE_DOCKER)
        docker.chmod(0o755)
        self.log = tmp_path / "docker_calls.jsonl"
        self.dataset = tmp_path / "my data"
        (self.dataset / "images").mkdir(parents=True)
        self.checkpoints = tmp_path / "ckpts"
        self.checkpoints.mkdir()
        self.logs = tmp_path / "logs out"

    def run(self, *args: str, **env_overrides: str | None) -> subprocess.CompletedProcess:
        env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(self.tmp),
            "FAKE_DOCKER_LOG": str(self.log),
            "FAKE_DOCKER_HAS_IMAGE": "1",
            "FAKE_DOCKER_RUNTIMES": '{"nvidia":{"path":"nvidia-container-runtime"},"runc":{}}',
            "SAM2_DATASET": str(self.dataset),
            "SAM2_CHECKPOINTS": str(self.checkpoints),
            "SAM2_LOGS": str(self.logs),
        }
        for key, value in env_overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return subprocess.run(
            ["bash", str(SCRIPT), *args], env=env, cwd=self.tmp, capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def run_call(self) -> list[str]:
        runs = [c for c in self.calls() if c[:1] == ["run"]]
        assert len(runs) == 1, self.calls()
        return runs[0]


@pytest.fixture
def launcher(tmp_path: Path) -> Launcher:
    return Launcher(tmp_path)


def _mounts(argv: list[str]) -> dict[str, str]:
    """target -> full --mount spec."""
    specs = [argv[i + 1] for i, a in enumerate(argv) if a == "--mount"]
    return {next(f for f in s.split(",") if f.startswith("target="))[7:]: s for s in specs}


def test_default_run_mounts_env_and_command_line(launcher: Launcher):
    proc = launcher.run("scratch.base_lr=1e-5", "dataset.gt_folder=/workspace/dataset/my masks")
    assert proc.returncode == 0, proc.stderr
    argv = launcher.run_call()
    for flag in ("--rm", "--init", "--ipc=host"):
        assert flag in argv
    assert argv[argv.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert argv[argv.index("--gpus") + 1] == "all"
    assert "-it" not in argv and "-t" not in argv  # stdin is not a TTY here
    mounts = _mounts(argv)
    assert set(mounts) == {"/workspace/dataset", "/checkpoints", "/workspace/sam2_logs"}
    assert mounts["/workspace/dataset"].endswith(",readonly")
    assert mounts["/checkpoints"].endswith(",readonly")
    assert "readonly" not in mounts["/workspace/sam2_logs"]
    assert "-v" not in argv and "--volume" not in argv
    image_at = argv.index("sam2-training:local")
    assert argv[image_at + 1 :] == [
        "-c", "sam2.1_training/custom_finetune", "--use-cluster", "0",
        "scratch.base_lr=1e-5", "dataset.gt_folder=/workspace/dataset/my masks",
    ]
    assert "SAM2_CONFIG=sam2.1_training/custom_finetune" in argv


def test_paths_with_spaces_and_commas_stay_one_mount(launcher: Launcher, tmp_path: Path):
    odd = tmp_path / "data, v2"
    odd.mkdir()
    assert launcher.run(SAM2_DATASET=str(odd)).returncode == 0
    spec = _mounts(launcher.run_call())
    dataset_spec = [s for s in spec.values() if "readonly" in s and "data" in s and "ckpts" not in s][0]
    assert f'"source={odd}"' in dataset_spec
    logs_spec = [s for s in spec.values() if "logs out" in s][0]
    assert f"source={launcher.logs}" in logs_spec


def test_config_gpus_image_and_num_gpus_variables(launcher: Launcher):
    proc = launcher.run(SAM2_CONFIG="my_run", SAM2_GPUS='"device=0,1"', SAM2_NUM_GPUS="2", SAM2_IMAGE="me/sam2:7")
    assert proc.returncode == 0, proc.stderr
    argv = launcher.run_call()
    assert argv[argv.index("--gpus") + 1] == '"device=0,1"'
    tail = argv[argv.index("me/sam2:7") + 1 :]
    assert tail == ["-c", "my_run", "--use-cluster", "0", "--num-gpus", "2"]


def test_cpu_only_passes_no_gpus_and_zero_num_gpus(launcher: Launcher):
    proc = launcher.run(SAM2_GPUS="none", FAKE_DOCKER_RUNTIMES='{"runc":{}}')
    assert proc.returncode == 0, proc.stderr
    argv = launcher.run_call()
    assert "--gpus" not in argv
    assert argv[-2:] == ["--num-gpus", "0"]


def test_shm_size_replaces_host_ipc(launcher: Launcher):
    assert launcher.run(SAM2_SHM_SIZE="16g").returncode == 0
    argv = launcher.run_call()
    assert "--shm-size=16g" in argv and "--ipc=host" not in argv


def test_exit_status_of_the_container_reaches_the_caller(launcher: Launcher):
    assert launcher.run(FAKE_DOCKER_EXIT="3").returncode == 3


def test_missing_image_is_built_with_the_callers_ids(launcher: Launcher):
    assert launcher.run(FAKE_DOCKER_HAS_IMAGE="0").returncode == 0
    build = [c for c in launcher.calls() if c[:1] == ["build"]]
    assert len(build) == 1
    assert f"USER_UID={os.getuid()}" in build[0] and f"USER_GID={os.getgid()}" in build[0]
    assert build[0][build[0].index("-f") + 1] == str(REPO / "Dockerfile.training")
    assert build[0][-1] == str(REPO)
    assert [c[0] for c in launcher.calls() if c[0] in ("build", "run")] == ["build", "run"]


def test_build_flag_rebuilds_existing_image(launcher: Launcher):
    assert launcher.run("--build").returncode == 0
    assert any(c[:1] == ["build"] for c in launcher.calls())


def test_dev_mounts_the_checkout_over_workspace(launcher: Launcher):
    assert launcher.run("--dev").returncode == 0
    assert "/workspace" in _mounts(launcher.run_call())


def test_logs_folder_is_created(launcher: Launcher):
    assert not launcher.logs.exists()
    assert launcher.run().returncode == 0
    assert launcher.logs.is_dir()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SAM2_DATASET": None}, "SAM2_DATASET is not set"),
        ({"SAM2_DATASET": "/nonexistent/data"}, "SAM2_DATASET=/nonexistent/data does not exist"),
        ({"SAM2_CHECKPOINTS": "/nonexistent/ckpt"}, "SAM2_CHECKPOINTS=/nonexistent/ckpt does not exist"),
        ({"SAM2_NUM_GPUS": "two"}, "SAM2_NUM_GPUS=two is not a whole number"),
        ({"SAM2_GPUS": "none", "SAM2_NUM_GPUS": "2"}, "SAM2_GPUS=none"),
        ({"FAKE_DOCKER_RUNTIMES": '{"runc":{}}'}, "no NVIDIA runtime"),
        ({"DOCKER": "/nonexistent/docker"}, "not found; install Docker"),
    ],
)
def test_bad_setup_stops_before_docker_runs(launcher: Launcher, env: dict, message: str):
    proc = launcher.run(**env)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not any(c[:1] in (["run"], ["build"]) for c in launcher.calls())


def test_a_file_where_a_folder_is_expected(launcher: Launcher, tmp_path: Path):
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    proc = launcher.run(SAM2_DATASET=str(not_a_dir))
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


def test_dry_run_prints_the_command_and_runs_nothing(launcher: Launcher):
    proc = launcher.run("--dry-run", "a=1")
    assert proc.returncode == 0
    assert "run --rm --init" in proc.stdout and "a=1" in proc.stdout
    assert not any(c[:1] == ["run"] for c in launcher.calls())


def test_help_documents_every_variable(launcher: Launcher):
    proc = launcher.run("--help", SAM2_DATASET=None)
    assert proc.returncode == 0
    for name in ("SAM2_DATASET", "SAM2_CONFIG", "SAM2_CHECKPOINTS", "SAM2_LOGS", "SAM2_NUM_GPUS", "SAM2_GPUS",
                 "SAM2_IMAGE", "DOCKER", "--build", "--dry-run"):
        assert name in proc.stdout
    assert launcher.calls() == []
