"""Model components, ours vs the official code: the same module, weights and inputs, side by side.

    python benchmarks/bench_components.py                      # this device's default setting
    python benchmarks/bench_components.py --quick              # CI mode
    python benchmarks/bench_components.py --model-size base_plus --resolution 1024 --batch 8 --profile

A training step mixes data loading, prompt simulation, the loss and the optimizer with the model;
when its time differs from the reference's, this says which part of the model it comes from. Each
component (`image_encoder`: trunk and neck; `memory_attention`: one frame attending to
`--memory-frames` memories and their object pointers) is built from the official model config of
`--model-size` in a fresh child process per run, alternating reference/ours/ours/reference, and
timed forward-only (`torch.no_grad`) and forward+backward in train mode, under bf16 autocast on
GPU as the trainer runs it. `--profile` adds a torch.profiler table per side (top ops by self
device time on GPU, CPU time on CPU) next to the report. Results go to
benchmarks/results/components.{md,json}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    BENCH_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    alternating_runs,
    default_device,
    gib,
    machine_info,
    median,
    ratio,
    reference_root,
    run_probe,
    write_report,
)
from benchmarks.train_config import MODEL_CONFIGS

PROBE = BENCH_DIR / "component_probe.py"
COMPONENTS = ("image_encoder", "memory_attention")


def run_side(
    side: str, component: str, run_index: int, *, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    run_dir = workdir / component / f"{side}-{run_index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "probe.json"
    config = reference_root() / "sam2" / "configs" / "sam2.1" / MODEL_CONFIGS[args.model_size]
    probe_args = [
        str(PROBE),
        *("--config", str(config), "--component", component, "--out", str(out)),
        *("--weights", str(workdir / f"{component}_weights.pt"), "--device", args.device, "--amp", args.amp),
        *("--batch", str(args.batch), "--resolution", str(args.resolution)),
        *("--memory-frames", str(args.memory_frames), "--warmup", str(args.warmup), "--iters", str(args.iters)),
        *(["--profile"] if args.profile else []),
    ]
    root = REPO_ROOT if side == "ours" else reference_root()
    record = run_probe(
        probe_args, side=side, root=root, run_dir=run_dir, out=out, threads=args.threads, timeout=args.timeout
    )
    record["profile_file"] = str(run_dir / "profile.txt")
    return record


def summarize(component: str, records: dict[str, list[dict]], errors: dict[str, list[str]]) -> dict[str, Any]:
    """One report row: per-side medians pooled over runs, ratios ours/reference."""
    row: dict[str, Any] = {"component": component}
    for side, runs in records.items():
        if not runs:
            row[f"{side}_errors"] = "; ".join(e.splitlines()[0] for e in errors[side]) or "no runs"
            continue
        for key in ("forward_s", "forward_cpu_s", "train_s", "train_cpu_s"):
            row[f"{side}_{key[:-2]}_ms"] = 1000 * median([v for run in runs for v in run[key]])
        row[f"{side}_peak_gib"] = gib(median([run["train_peak_bytes"] for run in runs]))
        if runs[0].get("ops_per_call") is not None:
            row[f"{side}_ops"] = runs[0]["ops_per_call"]
    for key in ("forward_ms", "forward_cpu_ms", "train_ms", "train_cpu_ms", "peak_gib", "ops"):
        row[f"{key}_ratio"] = ratio(row.get(f"ours_{key}"), row.get(f"reference_{key}"))
    if records.get("ours") and records.get("reference"):
        ours, ref = (torch.tensor(records[side][0]["output_sample"]) for side in ("ours", "reference"))
        row["output_rel_error"] = float((ours - ref).norm() / ref.norm().clamp_min(1e-12))
    row["errors"] = (
        "; ".join(f"{side}: {row[f'{side}_errors']}" for side in records if row.get(f"{side}_errors")) or None
    )
    return row


COLUMNS = [
    ("component", "component"),
    ("reference_train_ms", "ref fwd+bwd ms"),
    ("ours_train_ms", "ours fwd+bwd ms"),
    ("train_ms_ratio", "fwd+bwd ours/ref"),
    ("train_cpu_ms_ratio", "fwd+bwd CPU ours/ref"),
    ("reference_forward_ms", "ref fwd ms"),
    ("ours_forward_ms", "ours fwd ms"),
    ("forward_ms_ratio", "fwd ours/ref"),
    ("reference_peak_gib", "ref peak GiB"),
    ("ours_peak_gib", "ours peak GiB"),
    ("peak_gib_ratio", "mem ours/ref"),
    ("ops_ratio", "profiled ops ours/ref"),
    ("output_rel_error", "output rel. error"),
    ("errors", "errors"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--components", nargs="+", default=list(COMPONENTS), choices=COMPONENTS)
    parser.add_argument("--model-size", default=None, choices=sorted(MODEL_CONFIGS), help="default: tiny on CPU, base_plus on GPU")
    parser.add_argument("--resolution", type=int, default=None, help="default: 256 on CPU, 1024 on GPU")
    parser.add_argument("--batch", type=int, default=None, help="images (encoder) or objects (memory attention); default 4 on CPU, 8 on GPU")
    parser.add_argument("--memory-frames", type=int, default=6, help="spatial memories the memory attention reads")
    parser.add_argument("--amp", choices=("none", "bfloat16", "float16"), default=None, help="default: none on CPU, bfloat16 on GPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides")
    parser.add_argument("--sides", nargs="+", default=["reference", "ours"], choices=["reference", "ours"])
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler table per side")
    parser.add_argument("--quick", action="store_true", help="CI mode: tiny at 128 px, batch 1, 1 timed call, 1 run per side")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--workdir", type=Path, default=None, help="keep weights and logs here")
    args = parser.parse_args(argv)
    args.device = args.device or default_device()
    on_gpu = args.device == "cuda"
    if args.quick:
        args.model_size, args.resolution, args.batch = args.model_size or "tiny", args.resolution or 128, args.batch or 1
        args.warmup, args.iters, args.repeats, args.memory_frames = 1, 1, 1, 2
    args.model_size = args.model_size or ("base_plus" if on_gpu else "tiny")
    args.resolution = args.resolution or (1024 if on_gpu else 256)
    args.batch = args.batch or (8 if on_gpu else 4)
    args.amp = args.amp or ("bfloat16" if on_gpu else "none")
    if args.resolution % 32:
        raise SystemExit(f"--resolution {args.resolution} must be a multiple of 32 (Hiera's total stride)")
    if args.warmup < 0 or args.iters < 1:
        raise SystemExit(f"--warmup must be >= 0 and --iters >= 1 (got {args.warmup}, {args.iters})")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    results_dir = args.results_dir or RESULTS_DIR
    rows = []
    with tempfile.TemporaryDirectory(prefix="sam2-bench-components-") as tmp:
        workdir = args.workdir or Path(tmp)
        for component in args.components:
            records, errors = alternating_runs(
                component,
                args.sides,
                args.repeats,
                partial(run_side, component=component, workdir=workdir, args=args),
            )
            rows.append(summarize(component, records, errors))
            if args.profile:
                results_dir.mkdir(parents=True, exist_ok=True)
                for side, runs in records.items():
                    if runs and Path(runs[0]["profile_file"]).is_file():
                        shutil.copy(runs[0]["profile_file"], results_dir / f"components_{component}_{side}_profile.txt")
    meta = machine_info(args.device) | {
        "command": "python benchmarks/bench_components.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model_size": args.model_size,
        "resolution": args.resolution,
        "batch": args.batch,
        "memory_frames": args.memory_frames,
        "autocast": args.amp,
        "timed_calls_per_run": args.iters,
        "runs_per_side": args.repeats,
        "threads_per_side": args.threads or "torch default",
    }
    notes = (
        "fwd+bwd: one training-mode forward and backward of the component (gradients of all its "
        "parameters); fwd: one forward under torch.no_grad. Times are medians over all timed calls of all "
        "runs (device-synced wall time); peak: GPU = torch.cuda.max_memory_allocated over the fwd+bwd calls, "
        "CPU = the child's peak RSS (includes the process and the forward-only calls). profiled ops: torch.profiler "
        "events per fwd+bwd (with --profile), a proxy for launches. output rel. error: ‖ours − ref‖ / ‖ref‖ over "
        "evenly spaced samples of the eval-mode forward outputs, a check that both computed the same thing. Ratios below 1 favour ours."
    )
    md, _ = write_report(
        "components",
        title="Model components: ours vs reference",
        columns=COLUMNS,
        rows=rows,
        meta=meta,
        notes=notes,
        results_dir=results_dir,
    )
    print(md.read_text())
    return rows


if __name__ == "__main__":
    main()
