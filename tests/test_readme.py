"""The README cannot rot: every command, config name, key, default, path and error message in it
is checked against the code.

- Shell commands (```bash blocks, and inline `python ...` spans) are parsed like a shell would
  (continuations, `&&`, `VAR=value` prefixes). `training/train.py` commands (also under torchrun)
  go through the real parser and `--print-config`, which composes and resolves the config with
  the command's overrides without training. The other CLIs parse their arguments with their own
  parsers (stopped right after parsing); `check_dataset` runs for real where its folders exist.
  `./run_training_docker.sh --help` runs, and the other docker lines run with `--dry-run` against
  a fake `docker`.
- The quickstart command itself trains end to end in tests/test_train_quickstart.py.
- Tables: config defaults equal the composed `custom_finetune` config; model sizes name the right
  weights and model configs; troubleshooting messages occur in the source.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from sam2.build_sam import resolve_config_name
from tests.readme_commands import (
    COMMANDS,
    DEFAULT_CONFIG,
    MODULE_CLIS,
    REPO,
    TEXT,
    code_spans,
    command_kind,
    commands_of,
    fenced_blocks,
    module_cli,
    parse_module_cli,
    sections,
    table_rows,
)
from training.engine.config import compose_config, find_config_file
from training.train import build_parser as train_parser
from training.train import main as train_main
from training.utils.distributed import cuda_device_count

QUICKSTART = 'pip install -e ".[dev]" && python training/train.py -c sam2.1_training/quickstart --num-gpus 0'
TEST_COMMAND = 'pip install -e ".[dev]" && python -m pytest -n 2'
REPO_DIRS = ("sam2", "training", "configs", "examples", "tests", "docker", "benchmarks", "docs", ".ci")



def parse_train_args(args: list[str]) -> argparse.Namespace:
    parser = train_parser()
    parser.allow_abbrev = False  # the README must spell flags out in full
    try:
        return parser.parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"train.py does not accept {args} (exit {exc.code})")


def check_train_command(args: list[str], capsys) -> None:
    """Flags parse; config and overrides compose and resolve (`--print-config`)."""
    parsed = parse_train_args(args)
    args = list(args)
    if parsed.num_gpus and not parsed.use_cluster and parsed.num_gpus > cuda_device_count():
        # More GPUs than this machine has is a (tested) error before composing; compose on CPU.
        args[args.index("--num-gpus") + 1] = "0"
    capsys.readouterr()
    code = train_main([*args, "--print-config"])
    out, err = capsys.readouterr()
    assert code == 0, f"`train.py {' '.join(args)} --print-config` failed: {err}"
    config, missing = OmegaConf.create(yaml.safe_load(out)), object()
    for override in parsed.overrides:
        key = override.lstrip("+").partition("=")[0]
        if "." in key:
            assert OmegaConf.select(config, key, default=missing) is not missing, f"{override} did not land"


@pytest.fixture
def user_configs(tmp_path, monkeypatch):
    """The README's example configs (```yaml blocks headed `# configs/<name>.yaml`) in ./configs/."""
    (tmp_path / "configs").mkdir()
    for lang, body in fenced_blocks(TEXT):
        header = re.match(r"# (configs/[\w.-]+\.yaml)\n", body)
        if lang == "yaml" and header:
            (tmp_path / header.group(1)).write_text(body)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_two_commands_come_first_and_ci_runs_the_test_command():
    bash = [body.strip() for lang, body in fenced_blocks(TEXT) if lang == "bash"]
    assert bash[:2] == [QUICKSTART, TEST_COMMAND]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "python -m pytest -n 2" in ci
    assert any(line.endswith('pip install -e ".[dev]"') for line in ci)
    # The quickstart trains end to end in this test, with the README's config and flags.
    quickstart_test = (REPO / "tests" / "test_train_quickstart.py").read_text()
    assert '"-c", "sam2.1_training/quickstart", "--num-gpus", "0"' in quickstart_test


def test_every_command_is_one_this_test_knows():
    unknown = [str(c) for c in COMMANDS if command_kind(c) == "unknown"]
    assert not unknown, f"add a check for these README commands to tests/test_readme.py: {unknown}"
    for command in commands_of("pip"):
        assert command.argv == ["pip", "install", "-e", ".[dev]"], command
    markers = _pytest_markers()
    for expression in re.findall(r'-m "([^"]+)"', TEXT):
        words = re.findall(r"\w+", expression)
        assert all(w in ("not", "and", "or") or w in markers for w in words), f"unknown marker in -m {expression!r}"


def _pytest_markers() -> list[str]:
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as f:
        return [m.split(":")[0] for m in tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]]


@pytest.mark.parametrize("command", commands_of("train"), ids=str)
def test_train_commands_parse_and_compose(command, capsys, user_configs):
    args = command.argv[2:] if command.argv[1] == "training/train.py" else command.argv[3:]
    check_train_command(args, capsys)


@pytest.mark.parametrize("command", commands_of("torchrun"), ids=str)
def test_torchrun_commands_parse_and_compose(command, capsys, user_configs):
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(command.argv[1:])
    assert parsed.training_script == "training/train.py"
    check_train_command(parsed.training_script_args, capsys)


@pytest.mark.parametrize("command", commands_of("module"), ids=str)
def test_module_commands_parse(command, capsys, user_configs):
    module_name, args = module_cli(command.argv)
    namespace, _ = parse_module_cli(module_name, args)
    if getattr(namespace, "config", None):
        find_config_file(namespace.config)
    if module_name == "training.tools.check_dataset" and namespace.img_folder and namespace.gt_folder:
        folders = [REPO / namespace.img_folder, REPO / namespace.gt_folder]
        if all(f.is_dir() for f in folders):
            module = importlib.import_module(module_name)
            assert module.main(["--img-folder", str(folders[0]), "--gt-folder", str(folders[1])]) == 0
            assert "OK: the data can train" in capsys.readouterr().out


FAKE_DOCKER = """#!/bin/sh
# Stands in for docker: the image exists, the NVIDIA runtime is installed, everything succeeds.
case "$1" in
  info) echo '{"nvidia":{},"runc":{}}' ;;
esac
exit 0
"""


def run_docker_script(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), **env}
    script = REPO / "run_training_docker.sh"
    assert os.access(script, os.X_OK), "the README runs ./run_training_docker.sh: keep it executable"
    return subprocess.run(
        [str(script), *args], env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )


def test_docker_help_runs_and_documents_every_variable_and_option(tmp_path):
    helps = [c for c in commands_of("docker") if c.argv[1:] == ["--help"]]
    assert helps, "the README should show ./run_training_docker.sh --help"
    done = run_docker_script(["--help"], {}, tmp_path)
    assert done.returncode == 0, done.stderr
    for name in set(re.findall(r"\bSAM2_[A-Z_]+\b", sections(TEXT)["Docker"])):
        assert name in done.stdout, f"{name} is in the README but not in run_training_docker.sh --help"
    for option in re.findall(r"`(--[\w-]+)", sections(TEXT)["Docker"]):
        scripts = done.stdout + (REPO / "run_training_docker.sh").read_text() + (REPO / "Dockerfile.training").read_text()
        assert option in scripts, option


@pytest.mark.parametrize("command", [c for c in commands_of("docker") if c.argv[1:] != ["--help"]], ids=str)
def test_docker_commands_dry_run(command, tmp_path):
    env = dict(command.env)
    for name in ("SAM2_DATASET", "SAM2_CHECKPOINTS"):
        if name in env and not os.path.isdir(env[name]):
            (tmp_path / name).mkdir()
            env[name] = str(tmp_path / name)
    env.setdefault("SAM2_LOGS", str(tmp_path / "logs"))
    done = run_docker_script(["--dry-run", *command.argv[1:]], env, tmp_path)
    assert done.returncode == 0, done.stderr
    run_line = done.stdout.strip().splitlines()[-1]
    assert f"-c {env.get('SAM2_CONFIG', DEFAULT_CONFIG)} --use-cluster 0" in run_line
    for override in command.argv[1:]:
        assert override in run_line
    if "SAM2_NUM_GPUS" in env:
        assert f"--num-gpus {env['SAM2_NUM_GPUS']}" in run_line


def test_python_snippets_import_real_names_and_configs():
    blocks = [body for lang, body in fenced_blocks(TEXT) if lang == "python"]
    assert blocks
    for body in blocks:
        for node in ast.walk(ast.parse(body)):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", "").startswith("build_sam2"):
                name = node.args[0].value
                assert (REPO / "sam2" / resolve_config_name(name)).is_file(), name


def test_named_paths_configs_and_model_configs_exist():
    prefix = "|".join(re.escape(d) for d in REPO_DIRS)
    for path in re.findall(rf"(?<![\w/.$+-])((?:{prefix})/[\w.+/-]*)", TEXT):
        path = path.rstrip(".")
        if "my_" in path:
            continue  # the user's own files, e.g. configs/my_run.yaml
        assert (REPO / path).exists() or (REPO / "sam2" / path).exists(), path
    for name in ("Dockerfile.training", "run_training_docker.sh", "pyproject.toml"):
        assert name not in TEXT or (REPO / name).is_file(), name
    for name in set(re.findall(r"sam2\.1_training/[\w.+-]*\w", TEXT)):
        find_config_file(name)
    model_names = re.findall(r"\bsam2(?:\.1)?_hiera_(?:tiny|small|base_plus|large|t|s|b\+|l)(?![\w.])", TEXT)
    assert model_names
    for name in set(model_names):
        assert (REPO / "sam2" / resolve_config_name(name)).is_file(), name


def test_documented_defaults_equal_the_shipped_config():
    cfg, _ = compose_config(DEFAULT_CONFIG)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    checked = 0
    for title in ("Configuration", "Validation during training"):
        for row in table_rows(sections(TEXT)[title]):
            key, default = code_spans(row[0]), code_spans(row[1])
            if len(key) != 1 or len(default) != 1 or "." not in key[0]:
                continue
            missing = object()
            actual = OmegaConf.select(resolved, key[0], default=missing)
            assert actual is not missing, f"{key[0]} is documented but not in {DEFAULT_CONFIG}"
            assert actual == yaml.safe_load(default[0]), f"{key[0]}: README says {default[0]}, config has {actual}"
            checked += 1
    assert checked >= 20


def test_model_size_table_names_each_sizes_weights_and_model_config():
    rows = [r for r in table_rows(sections(TEXT)["Choosing the model size"]) if len(r) == 3]
    assert [code_spans(r[0])[0] for r in rows] == ["tiny", "small", "base_plus", "large"]
    for size, weights, model_config in ([code_spans(c)[0] for c in row] for row in rows):
        group = yaml.safe_load((REPO / "sam2/configs/sam2.1_training/model_size" / f"{size}.yaml").read_text())
        assert group["scratch"]["model_weights"] == weights
        assert "configs/" + resolve_config_name(model_config).removeprefix("configs/")[:-5] == group["defaults"][0][1:]


def test_inline_overrides_compose():
    spans = set(re.findall(r"`(\+{0,2}[a-z_][\w.]*=(?!=)[^`\s|…\"]+)`", TEXT))
    assert len(spans) >= 10
    for override in sorted(spans):
        compose_config(DEFAULT_CONFIG, [override])


def test_flags_mentioned_anywhere_exist():
    known = set(train_parser()._option_string_actions)
    for module_name in set(MODULE_CLIS.values()):
        _, parser = parse_module_cli(module_name, _minimal_args(module_name))
        known |= set(parser._option_string_actions)
    from torch.distributed.run import get_args_parser

    known |= set(get_args_parser()._option_string_actions)
    scripts = (REPO / "run_training_docker.sh").read_text() + (REPO / "Dockerfile.training").read_text()
    for flag in set(re.findall(r"`(--[a-z][\w-]*)", TEXT)):
        assert flag in known or flag in scripts, f"{flag} is in the README but no CLI has it"


def _minimal_args(module_name: str) -> list[str]:
    return {"training.export": ["x.pt", "--model-config", "sam2.1_hiera_t"]}.get(module_name, [])


def test_troubleshooting_messages_come_from_the_code():
    sources = [*REPO.glob("training/**/*.py"), *REPO.glob("sam2/**/*.py"), REPO / "run_training_docker.sh"]
    code = "\n".join(p.read_text() for p in sources)
    # Messages are split over implicitly concatenated literals: "... there, "\n f"or override ..."
    code = re.sub(r"[\"']\s*\n\s*[rf]*[\"']", "", code)
    rows = table_rows(sections(TEXT)["Troubleshooting"])
    checked = 0
    for row in rows:
        if "(from PyTorch)" in row[0]:
            continue
        message = re.sub(r"['\"]…['\"]", "…", code_spans(row[0])[0])
        fragments = [f.strip() for f in message.split("…") if len(f.strip()) >= 8]
        assert fragments, message
        for fragment in fragments:
            assert fragment in code, f"troubleshooting message {message!r}: {fragment!r} is not in the code"
        checked += 1
    assert checked >= 12


def test_slurm_keys_are_read_by_the_launcher():
    launcher = (REPO / "training" / "engine" / "launch.py").read_text()
    bullets = "\n".join(line for line in sections(TEXT)["SLURM"].splitlines() if line.lstrip().startswith(("-", "  ")))
    keys = re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", bullets)
    assert len(keys) >= 8
    for key in keys:
        assert f'"{key.split(".")[0]}"' in launcher, f"submitit.{key} is documented but launch.py does not read it"


def test_links_to_sections_resolve():
    titles = re.findall(r"^#+ (.+)$", TEXT, re.MULTILINE)
    slugs = {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-") for title in titles}  # GitHub's anchors
    for anchor in re.findall(r"\]\(#([^)]+)\)", TEXT):
        assert anchor in slugs, f"link to #{anchor}, but no heading has that anchor"


def test_validation_options_exist():
    from training.engine.validation_hook import ValidationConf

    paragraph = re.search(r"`trainer\.validation` also takes(.*?)\n\n", TEXT, re.DOTALL).group(1)
    names = re.findall(r"`([a-z_]+)`", paragraph)
    fields = {f.name for f in dataclasses.fields(ValidationConf)}
    metrics_source = (REPO / "training" / "evaluation" / "image_eval.py").read_text()
    assert len(names) >= 4
    for name in names:
        assert name in fields or re.search(rf"\b{name}\b", metrics_source), f"trainer.validation: {name}?"
