"""The reference oracle: the official SAM 2 code (`sam2==1.1.0` on PyPI), run in its own process.

The official sources are fetched once into the git-ignored `.cache/sam2-reference/` and never
imported into this process: a snippet runs in a child Python whose `PYTHONPATH` starts with the
unpacked sources and whose working directory is a temporary folder, so `import sam2` and
`import training` resolve to the reference there. Tensors travel both ways through `torch.save`.

Usage (see the `reference` fixture in conftest.py):

    out = reference.run('''
        from sam2.modeling.sam2_utils import MLP
        torch.manual_seed(0)
        mlp = MLP(8, 16, 4, 3)
        outputs["state_dict"] = mlp.state_dict()
        outputs["y"] = mlp(inputs["x"])
    ''', x=torch.randn(2, 8))
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

REFERENCE_VERSION = "1.1.0"
REFERENCE_SHA256 = "7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74"
REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "sam2-reference"
REFERENCE_ROOT = CACHE_DIR / f"sam2-{REFERENCE_VERSION}"

# Runs in the child: load inputs, exec the snippet, save outputs.
_DRIVER = """
import sys, torch
import sam2
if not sam2.__file__.startswith(sys.argv[4]):
    raise SystemExit(f"reference process imported sam2 from {sam2.__file__}, not from {sys.argv[4]}")
inputs = torch.load(sys.argv[1], weights_only=False)
outputs = {}
with open(sys.argv[2]) as f:
    code = f.read()
exec(compile(code, "<reference snippet>", "exec"), {"torch": torch, "inputs": inputs, "outputs": outputs})
torch.save(outputs, sys.argv[3])
"""


class ReferenceUnavailable(RuntimeError):
    pass


def _index_url() -> str:
    return os.environ.get("SAM2_REFERENCE_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def _download_sdist(dest: Path) -> None:
    page_url = f"{_index_url()}/sam2/"
    try:
        page = urllib.request.urlopen(page_url, timeout=60).read().decode()
    except OSError as exc:
        raise ReferenceUnavailable(f"cannot reach {page_url}: {exc}") from exc
    name = f"sam2-{REFERENCE_VERSION}.tar.gz"
    links = [href for href in re.findall(r'href="([^"]+)"', page) if name in href]
    if not links:
        raise ReferenceUnavailable(f"{page_url} lists no {name}")
    url = links[0].split("#")[0]
    if url.startswith("/") or not url.startswith("http"):
        url = urllib.parse.urljoin(page_url, url)
    data = urllib.request.urlopen(url, timeout=300).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != REFERENCE_SHA256:
        raise ReferenceUnavailable(f"{url} has sha256 {digest}, expected {REFERENCE_SHA256}")
    dest.write_bytes(data)


def ensure_reference() -> Path:
    """Path of the unpacked official sources, fetching them on first use (safe across processes)."""
    if (REFERENCE_ROOT / "sam2" / "modeling" / "sam2_base.py").is_file():
        return REFERENCE_ROOT
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (REFERENCE_ROOT / "sam2" / "modeling" / "sam2_base.py").is_file():
            tarball = CACHE_DIR / f"sam2-{REFERENCE_VERSION}.tar.gz"
            if not tarball.is_file():
                tmp = tarball.with_suffix(".part")
                _download_sdist(tmp)
                tmp.rename(tarball)
            with tarfile.open(tarball) as tar:
                tar.extractall(CACHE_DIR, filter="data")
    return REFERENCE_ROOT


class Reference:
    """Runs snippets of Python against the official code in a fresh child process."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, code: str, timeout: float = 900, **inputs: Any) -> dict[str, Any]:
        """Exec `code` with `torch`, `inputs` (the keyword arguments) and an `outputs` dict in scope.

        Returns `outputs` as the snippet left it. Raises with the child's stderr on failure.
        """
        with tempfile.TemporaryDirectory(prefix="sam2-ref-") as tmp:
            tmp_path = Path(tmp)
            in_file, code_file, out_file = tmp_path / "in.pt", tmp_path / "code.py", tmp_path / "out.pt"
            torch.save(inputs, in_file)
            code_file.write_text(textwrap.dedent(code))
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
            env["PYTHONPATH"] = str(self.root)
            env["PYTHONNOUSERSITE"] = "1"
            env.setdefault("OMP_NUM_THREADS", "1")
            cmd = [sys.executable, "-c", _DRIVER, str(in_file), str(code_file), str(out_file), str(self.root)]
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"reference snippet failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
            return torch.load(out_file, weights_only=False)


def assert_close(ours: Any, ref: Any, *, rtol: float = 1e-5, atol: float = 1e-5, path: str = "") -> None:
    """Recursive `torch.testing.assert_close` over tensors nested in dicts, lists and tuples."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict), f"{path}: expected dict, got {type(ours)}"
        assert set(ours) == set(ref), f"{path}: keys differ: {sorted(set(ours) ^ set(ref))}"
        for key in ref:
            assert_close(ours[key], ref[key], rtol=rtol, atol=atol, path=f"{path}.{key}")
    elif isinstance(ref, (list, tuple)):
        assert len(ours) == len(ref), f"{path}: length {len(ours)} != {len(ref)}"
        for i, (o, r) in enumerate(zip(ours, ref)):
            assert_close(o, r, rtol=rtol, atol=atol, path=f"{path}[{i}]")
    elif isinstance(ref, torch.Tensor):
        torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, msg=lambda m: f"{path}: {m}")
    else:
        assert ours == ref, f"{path}: {ours!r} != {ref!r}"


def assert_close_scaled(ours: Any, ref: Any, *, rtol: float = 1e-5, atol: float = 1e-5, path: str = "") -> None:
    """`assert_close` with `atol` scaled by each reference tensor's largest magnitude (at least 1).

    For values far from 1, float32 sums split differently across threads differ by ~1e-7 of the
    magnitude; this is that tolerance, not a looser one.
    """
    if isinstance(ref, torch.Tensor) and ref.is_floating_point() and ref.numel():
        scale = max(1.0, ref.detach().abs().max().item())
        assert_close(ours, ref, rtol=rtol, atol=atol * scale, path=path)
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and set(ours) == set(ref), f"{path}: keys differ"
        for key in ref:
            assert_close_scaled(ours[key], ref[key], rtol=rtol, atol=atol, path=f"{path}.{key}")
    elif isinstance(ref, (list, tuple)):
        assert len(ours) == len(ref), f"{path}: length {len(ours)} != {len(ref)}"
        for i, (o, r) in enumerate(zip(ours, ref)):
            assert_close_scaled(o, r, rtol=rtol, atol=atol, path=f"{path}[{i}]")
    else:
        assert_close(ours, ref, rtol=rtol, atol=atol, path=path)
