"""Reading the README for tests/test_readme.py: fenced blocks, sections, tables, and the shell
commands in it, parsed as a shell would; and running an argparse CLI's `main` up to its parsing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEXT = (REPO / "README.md").read_text()
DEFAULT_CONFIG = "sam2.1_training/custom_finetune"
# Variables the README's commands use; the shell would fill them in the same way.
SHELL_VARIABLES = {"PWD": str(REPO), "SAM2_CONFIG": DEFAULT_CONFIG}
# How the README invokes each argparse CLI -> its module (whose main(argv) parses argv).
MODULE_CLIS = {
    "-m training.tools.check_dataset": "training.tools.check_dataset",
    "-m training.tools.make_sample_data": "training.tools.make_sample_data",
    "-m training.export": "training.export",
    "-m training.evaluate": "training.evaluate",
    "training/evaluate.py": "training.evaluate",
}


# ---- reading the README ----------------------------------------------------------------------


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)]


def sections(text: str) -> dict[str, str]:
    """Body of each `## ` section by its title."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def table_rows(section: str) -> list[list[str]]:
    """Cells of the markdown table body rows in `section` (`\\|` is a literal bar)."""
    lines = section.splitlines()
    rows = []
    for line, following in zip(lines, [*lines[1:], ""]):
        if line.startswith("|") and not line.startswith("| ---") and not following.startswith("| ---"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __str__(self) -> str:
        return " ".join([*(f"{k}={v}" for k, v in self.env.items()), *self.argv])[:100]


def expand(token: str) -> str:
    return re.sub(r"\$(\w+)", lambda m: SHELL_VARIABLES.get(m.group(1), m.group(0)), token)


def parse_shell(text: str) -> list[Command]:
    """Commands of a shell snippet: continuations joined, comments dropped, split at `&&`."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = [expand(w) for w in shlex.split(line, comments=True)]
        chunks: list[list[str]] = [[]]
        for word in words:
            if word == "&&":
                chunks.append([])
            else:
                chunks[-1].append(word)
        for chunk in chunks:
            env = {}
            while chunk and re.match(r"^[A-Z_][A-Z0-9_]*=", chunk[0]):
                key, _, value = chunk.pop(0).partition("=")
                env[key] = value
            commands.append(Command(chunk, env, line.strip()))
    return commands


def readme_commands() -> list[Command]:
    commands = []
    for lang, body in fenced_blocks(TEXT):
        if lang == "bash":
            commands += parse_shell(body)
    prose = re.sub(r"^```.*?^```", "", TEXT, flags=re.MULTILINE | re.DOTALL)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.startswith(("python ", "./run_training_docker.sh", "torchrun ")):
            commands += parse_shell(span)
    return commands


COMMANDS = readme_commands()


def commands_of(kind: str) -> list[Command]:
    return [c for c in COMMANDS if command_kind(c) == kind]


def command_kind(command: Command) -> str:
    argv = command.argv
    if argv[:2] == ["python", "training/train.py"] or argv[:3] == ["python", "-m", "training.train"]:
        return "train"
    if argv[:1] == ["torchrun"]:
        return "torchrun"
    if argv[:1] == ["./run_training_docker.sh"]:
        return "docker"
    if argv[:1] == ["pip"]:
        return "pip"
    if argv[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if argv[:1] == ["python"] and module_cli(argv) is not None:
        return "module"
    return "unknown"


def module_cli(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) of a `python -m module ...` or `python path.py ...` command."""
    for invocation, module in MODULE_CLIS.items():
        words = invocation.split()
        if argv[1 : 1 + len(words)] == words:
            return module, argv[1 + len(words) :]
    return None


# ---- running a CLI up to its argument parsing --------------------------------------------------


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
        self.namespace, self.parser = namespace, parser


@contextlib.contextmanager
def stop_after_parsing():
    """A CLI's `main` parses its arguments with its own parser, then stops (raises _Parsed)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        self.allow_abbrev = False  # the README must spell flags out in full
        raise _Parsed(original(self, args, namespace), self)

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parse_module_cli(module_name: str, args: list[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    module = importlib.import_module(module_name)
    with stop_after_parsing():
        try:
            module.main(args)
        except _Parsed as parsed:
            return parsed.namespace, parsed.parser
        except SystemExit as exc:
            pytest.fail(f"`python -m {module_name} {' '.join(args)}` does not parse (exit {exc.code})")
    pytest.fail(f"{module_name}.main did not parse its arguments with argparse")
