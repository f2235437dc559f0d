"""Dockerfile.training: lint clean, and built in the order and shape the container path promises."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile.training"


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    with open(DOCKERFILE, "rb") as f:
        parser = DockerfileParser(fileobj=f)
        return parser.structure


def _first(instructions: list[dict], name: str, contains: str = "") -> int:
    return next(i for i, ins in enumerate(instructions) if ins["instruction"] == name and contains in ins["value"])


def _linter(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not on PATH; it is a dev dependency: pip install -e '.[dev]'")
    return path


def test_hadolint_is_clean():
    proc = subprocess.run([_linter("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_is_clean():
    scripts = [REPO / "run_training_docker.sh", REPO / ".ci" / "run"]
    proc = subprocess.run([_linter("shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_pinned_and_overridable(instructions):
    arg = instructions[_first(instructions, "ARG", "BASE_IMAGE")]["value"]
    default = arg.split("=", 1)[1]
    assert ":" in default and not default.endswith(":latest"), default
    assert instructions[_first(instructions, "FROM")]["value"] == "${BASE_IMAGE}"


def test_dependencies_are_installed_before_the_source_is_copied(instructions):
    manifest = _first(instructions, "COPY", "pyproject.toml")
    install = _first(instructions, "RUN", "pip install")
    source = _first(instructions, "COPY", ". /workspace")
    assert manifest < install < source
    assert "--no-cache-dir" in instructions[install]["value"]
    apt = instructions[_first(instructions, "RUN", "apt-get")]["value"]
    assert "--no-install-recommends" in apt and "rm -rf /var/lib/apt/lists" in apt


def test_runs_as_a_numeric_non_root_user(instructions):
    user = [ins["value"] for ins in instructions if ins["instruction"] == "USER"][-1]
    assert user == "${USER_UID}:${USER_GID}"
    args = {ins["value"].split("=")[0]: ins["value"].split("=")[1] for ins in instructions if ins["instruction"] == "ARG" and "=" in ins["value"]}
    assert args["USER_UID"].isdigit() and args["USER_UID"] != "0"


def test_environment_and_exec_form_entrypoint(instructions):
    env = " ".join(ins["value"] for ins in instructions if ins["instruction"] == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "HOME=/home/sam2", "TORCH_HOME=", "PYTHONPATH=/workspace"):
        assert setting in env
    entrypoint = instructions[_first(instructions, "ENTRYPOINT")]["value"]
    assert json.loads(entrypoint) == ["python", "training/train.py"]
    assert instructions[_first(instructions, "WORKDIR")]["value"] == "/workspace"


def test_dockerignore_keeps_data_weights_and_history_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    for entry in (".git", ".cache", "sam2_logs", "dataset", "checkpoints", "*.pt", ".venv"):
        assert entry in ignored
