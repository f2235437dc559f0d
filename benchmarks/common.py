"""Shared pieces of the benchmarks: child processes for each side, timing, peak memory, reports.

Every measurement runs in a child process of its own, ours and the reference's alike, so neither
side inherits the other's imports, caches or allocator state. The reference is the official code
(`sam2==1.1.0`, fetched by `tests/reference.py` into `.cache/sam2-reference/`); its child gets a
`PYTHONPATH` that starts with the official sources and a working directory outside the repository,
so `import sam2` / `import training` resolve there and never to our editable install.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
SIDES = ("reference", "ours")

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched by substring of
# `torch.cuda.get_device_name()`; first match wins, so longer names come first.
GPU_BF16_PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("A6000", 155e12),
]


# ----------------------------------------------------------------------------- the two sides


def reference_root() -> Path:
    """The unpacked official sources (downloaded on first use by tests/reference.py)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.reference import ensure_reference

    return ensure_reference()


def copy_reference_tree(dest: Path) -> Path:
    """A private copy of the official `sam2/` and `training/` packages under `dest`.

    The official trainer only finds configs inside its own `sam2/configs/` package, so benchmark
    configs are written into this copy; the cache itself is never modified.
    """
    root = reference_root()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("sam2", "training"):
        target = dest / package
        if not target.exists():
            shutil.copytree(root / package, target, ignore=ignore)
    return dest


def child_env(side: str, *, pythonpath: Path | None = None, threads: int | None = None) -> dict[str, str]:
    """Environment for a child running `side`: the right package first on the path, nothing else.

    `pythonpath` defaults to the repository (ours) or the official sources (reference).
    """
    if side not in SIDES:
        raise ValueError(f"side is {side!r}; expected one of {SIDES}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    root = pythonpath or (REPO_ROOT if side == "ours" else reference_root())
    env["PYTHONPATH"] = str(root)
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["HYDRA_FULL_ERROR"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


class ChildFailed(RuntimeError):
    """A benchmark child process exited non-zero; the message holds the end of its output."""


def run_child(
    args: Sequence[str], *, env: dict[str, str], cwd: Path, log_file: Path, timeout: float | None = None
) -> float:
    """Runs `python *args` in `cwd`, output to `log_file`; returns wall seconds or raises ChildFailed."""
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, *args],
                check=False,
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise ChildFailed(f"timed out after {timeout} s; log: {log_file}") from None
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace")[-4000:]
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        raise ChildFailed(f"exit {proc.returncode}: {last.strip()[:200]} (log: {log_file})\n{tail}")
    return time.perf_counter() - start


def run_probe(
    probe_args: Sequence[str], *, side: str, root: Path, run_dir: Path, out: Path, threads: int | None,
    timeout: float | None,
) -> dict[str, Any]:
    """Runs one side's probe child (`python *probe_args` in `run_dir`, with `root` first on its path
    and its output in `run_dir/output.log`) and returns the JSON record it wrote to `out`, checked
    to come from `root`'s code. Raises ChildFailed if the child fails or writes no record."""
    env = child_env(side, pythonpath=root, threads=threads)
    run_child(probe_args, env=env, cwd=run_dir, log_file=run_dir / "output.log", timeout=timeout)
    if not out.exists():
        raise ChildFailed(f"the {side} child wrote no record to {out}; log: {run_dir / 'output.log'}")
    record = json.loads(out.read_text())
    check_imported_from(record.get("modules", {}), side, root)
    return record


def probe_both_sides(
    probe: Path, spec: dict[str, Any], case_dir: Path, *, timeout: float | None
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Runs `probe --spec <spec> --out <record>` for the reference, then for ours, in
    `case_dir/<side>/`, on the same spec (written to `case_dir/spec.json`), one thread each.
    Returns the records of the sides that succeeded and a message per side that failed."""
    case_dir.mkdir(parents=True, exist_ok=True)
    spec_file = case_dir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    records, errors = {}, []
    for side, root in (("reference", reference_root()), ("ours", REPO_ROOT)):
        run_dir = case_dir / side
        run_dir.mkdir(parents=True, exist_ok=True)
        out = run_dir / "record.json"
        args = [str(probe), "--spec", str(spec_file), "--out", str(out)]
        try:
            records[side] = run_probe(args, side=side, root=root, run_dir=run_dir, out=out, threads=1, timeout=timeout)
        except ChildFailed as failure:
            errors.append(f"{side}: {failure}")
    return records, errors


def alternating_runs(
    label: str, sides: Sequence[str], repeats: int, run: Callable[..., dict[str, Any]]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]]]:
    """`run(side=..., run_index=...)` for each side, `repeats` times, alternating (a, b, b, a, ...),
    so slow drift of a shared machine hits both sides alike. Returns each side's records and the
    messages of its failed runs (a failed run is reported and skipped, not fatal)."""
    records: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    errors: dict[str, list[str]] = {side: [] for side in sides}
    for repeat in range(repeats):
        for side in sides if repeat % 2 == 0 else list(sides)[::-1]:
            print(f"[{label}] run {repeat + 1}/{repeats}: {side}", flush=True)
            try:
                records[side].append(run(side=side, run_index=repeat))
            except ChildFailed as exc:
                print(f"[{label}] {side} failed: {exc}", file=sys.stderr, flush=True)
                errors[side].append(str(exc))
    return records, errors


def check_imported_from(module_files: dict[str, str], side: str, root: Path) -> None:
    """Raises unless every package a child reported (`name -> __file__`) lives under `root`."""
    for name, file in module_files.items():
        if file and not Path(file).resolve().is_relative_to(root.resolve()):
            raise ChildFailed(f"the {side} child imported {name} from {file}, not from {root}")


# ----------------------------------------------------------------------------- training-step probe children
# memory_probe.py and host_ops_probe.py load this file by path and run with one side's packages
# first on the path: `sam2` and `training` are imported inside these functions, from that side.

# Ops that only allocate or reinterpret (no kernel on a GPU), besides views and `prim` queries.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "lift_fresh"}


def launches_kernels(func: torch._ops.OpOverload) -> bool:
    return not func.is_view and func.namespace != "prim" and func._opname not in NO_KERNEL


def read_probe_spec() -> tuple[dict[str, Any], str]:
    """`--spec spec.json --out record.json` of a probe child: (the spec, the record's path)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.spec) as f:
        return json.load(f), args.out


def build_model_and_loss(spec: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The spec's training model (in train mode) and loss, built by Hydra from seed 0."""
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(spec["model"], _convert_="all").train(), instantiate(spec["loss"], _convert_="all")


def clip_batch(frames: int, objects: int, resolution: int, device: str = "cpu") -> Any:
    """A batch-1 clip on `device`: random image values, one rectangle per object moving a pixel
    per frame."""
    from training.utils.data_utils import BatchedVideoDatapoint, BatchedVideoMetaData

    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(frames, objects, resolution, resolution, dtype=torch.bool)
    for t in range(frames):
        for obj in range(objects):
            top, left = resolution // 16 + 5 * obj + t, resolution // 10 + 7 * obj
            masks[t, obj, top : top + resolution // 3, left : left + resolution // 4] = True
    return BatchedVideoDatapoint(
        img_batch=torch.rand(frames, 1, 3, resolution, resolution, generator=gen).to(device),
        obj_to_frame_idx=torch.tensor([[[t, 0]] * objects for t in range(frames)], dtype=torch.int).to(device),
        masks=masks.to(device),
        metadata=BatchedVideoMetaData(
            unique_objects_identifier=torch.zeros(frames, objects, 3, dtype=torch.long).to(device),
            frame_orig_size=torch.full((frames, objects, 2), resolution, dtype=torch.long).to(device),
        ),
        dict_key="all",
        batch_size=[frames],
    )


def imported_packages() -> dict[str, str]:
    """`sam2` and `training` as a probe child imported them (name -> `__file__`), for
    `check_imported_from`."""
    return {name: getattr(sys.modules.get(name), "__file__", "") for name in ("sam2", "training")}


# ----------------------------------------------------------------------------- timing and memory


def sync_device() -> None:
    """Waits for queued GPU work, so a wall-clock reading covers it (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_calls(
    fn: Callable[[], Any], *, warmup: int, iters: int, cpu_seconds: list[float] | None = None
) -> list[float]:
    """Wall seconds per call of `fn` for `iters` calls after `warmup` untimed ones (device-synced).

    When `cpu_seconds` is given, each timed call's process CPU time (all threads) is appended to it:
    on a shared machine that is the steadier measure of the work done.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync_device()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        sync_device()
        times.append(time.perf_counter() - start)
        if cpu_seconds is not None:
            cpu_seconds.append(time.process_time() - cpu_start)
    return times


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values: the run produced no measurements")
    return float(statistics.median(values))


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; `ru_maxrss` where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Starts a new VmHWM window (Linux `clear_refs`); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak GPU memory allocated by torch on a CUDA device, else peak RSS of this process."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def gpu_bf16_peak_flops(name: str) -> float | None:
    """Dense bf16 peak of the named GPU; `BENCH_PEAK_FLOPS` (FLOP/s) overrides the table."""
    if os.environ.get("BENCH_PEAK_FLOPS"):
        return float(os.environ["BENCH_PEAK_FLOPS"])
    for key, flops in GPU_BF16_PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on, for the report header."""
    info: dict[str, Any] = {
        "device": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_bf16_peak_flops"] = gpu_bf16_peak_flops(info["gpu"])
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------- reports


def ratio(ours: float | None, reference: float | None) -> float | None:
    """ours / reference, or None when either side is missing."""
    if ours is None or reference is None or reference == 0:
        return None
    return ours / reference


def format_cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub markdown table; `columns` are (row key, header) pairs."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def write_report(
    name: str,
    *,
    title: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    notes: str = "",
    results_dir: Path | None = None,
) -> tuple[Path, Path]:
    """Writes `<results_dir>/<name>.md` (table + machine) and `<name>.json`; returns both paths."""
    folder = Path(results_dir or RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    md_path, json_path = folder / f"{name}.md", folder / f"{name}.json"
    meta_lines = [f"- {key}: {format_cell(value)}" for key, value in meta.items()]
    text = f"# {title}\n\n{markdown_table(columns, rows)}\n\n" + "\n".join(meta_lines) + "\n"
    if notes:
        text += f"\n{notes.strip()}\n"
    md_path.write_text(text)
    json_path.write_text(json.dumps({"title": title, "meta": meta, "rows": list(rows)}, indent=2, default=str))
    return md_path, json_path


def gib(num_bytes: float | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**30
