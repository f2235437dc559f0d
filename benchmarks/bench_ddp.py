"""DDP settings on and off, in our trainer with several processes: step time and peak memory per rank.

    python benchmarks/bench_ddp.py                                   # 2 CPU ranks, the quickstart config
    python benchmarks/bench_ddp.py --ranks 2 --epochs 8 --repeats 2
    python benchmarks/bench_ddp.py --quick                           # CI

Each run is `torchrun --standalone --nproc_per_node <ranks>` of `train_probe.py` around our
`training/train.py` (so every rank records its optimizer steps and its peak RSS, or
`torch.cuda.max_memory_allocated` on GPUs), on `sam2.1_training/quickstart` (SAM 2.1 tiny, 128 px,
the sample images; validation off) with one setting's overrides. Settings alternate run by run.
Reported per setting: the median step time over all ranks' steps after the first `--warmup`, and
the largest per-rank peak memory, median over runs.

The settings are the DDP fast paths of issue 9 that the configs can switch:
`trainer.distributed.gradient_as_bucket_view` (gradients stored in DDP's all-reduce buckets,
not beside them). `find_unused_parameters` cannot be switched off for SAM 2 training: a step
leaves some weights without a gradient (on single images, the memory attention and encoder), and
DDP would stop at the next step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BENCH_DIR, REPO_ROOT, RESULTS_DIR, gib, ratio, write_report

SETTINGS = {
    "default": [],
    "no bucket view": ["+trainer.distributed.gradient_as_bucket_view=false"],
}
COLUMNS = [
    ("setting", "setting"),
    ("s_per_iter", "s/iter"),
    ("time_vs_default", "time vs default"),
    ("peak_gib", "peak GiB per rank"),
    ("memory_vs_default", "memory vs default"),
    ("steps_timed", "steps timed"),
    ("errors", "errors"),
]


def run_once(setting: str, run_index: int, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """One torchrun of our trainer with `setting`; returns each rank's probe record."""
    run_dir = workdir / f"{setting.replace(' ', '_')}-{run_index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
        str(BENCH_DIR / "train_probe.py"), "--out", str(run_dir / "probe_{rank}.json"), "--",
        str(REPO_ROOT / "training" / "train.py"), "-c", "sam2.1_training/quickstart",
        f"scratch.num_epochs={args.epochs}", "trainer.val_epoch_freq=100000", "trainer.validation=null",
        f"launcher.experiment_log_dir={run_dir / 'log'}", *SETTINGS[setting],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(run_dir / "output.log", "w") as log:
        proc = subprocess.run(
            cmd, check=False, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{setting}: exit {proc.returncode}; log: {run_dir / 'output.log'}")
    return [json.loads((run_dir / f"probe_{rank}.json").read_text()) for rank in range(args.ranks)]


def summarize(setting: str, runs: list[list[dict[str, Any]]], warmup: int) -> dict[str, Any]:
    steps, peaks = [], []
    for ranks in runs:
        for record in ranks:
            times = record["step_times"]
            steps += [b - a for a, b in zip(times[warmup - 1 :], times[warmup:])]
        peaks.append(max(max(record["peak_memory"]) for record in ranks))
    return {
        "setting": setting,
        "s_per_iter": statistics.median(steps) if steps else None,
        "peak_gib": gib(statistics.median(peaks)) if peaks else None,
        "steps_timed": len(steps),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8, help="of 8 images, batch 2 per rank")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each rank's run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="CI: 2 epochs, 1 run per setting")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep every run's log and records here")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats, args.warmup = 2, 1, 1
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sam2-bench-ddp-") as tmp:
        workdir = args.workdir or Path(tmp)
        runs: dict[str, list] = {setting: [] for setting in SETTINGS}
        errors: dict[str, list[str]] = {setting: [] for setting in SETTINGS}
        for repeat in range(args.repeats):
            order = list(SETTINGS) if repeat % 2 == 0 else list(SETTINGS)[::-1]
            for setting in order:
                print(f"[ddp] run {repeat + 1}/{args.repeats}: {setting}", flush=True)
                try:
                    runs[setting].append(run_once(setting, repeat, args, workdir))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    errors[setting].append(str(exc))
        rows = [{**summarize(setting, runs[setting], args.warmup), "errors": "; ".join(errors[setting]) or None}
                for setting in SETTINGS]  # fmt: skip
    default = rows[0]
    for row in rows:
        row["time_vs_default"] = ratio(row["s_per_iter"], default["s_per_iter"])
        row["memory_vs_default"] = ratio(row["peak_gib"], default["peak_gib"])
    meta = {
        "command": "python benchmarks/bench_ddp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "ranks": args.ranks,
        "config": f"sam2.1_training/quickstart, {args.epochs} epochs, validation off",
    }
    notes = (
        "s/iter: median over every rank's steps after the first warm-up ones (epoch starts included). Peak: the "
        "largest rank's peak RSS (CPU) or max_memory_allocated (GPU), median over runs."
    )
    md, _ = write_report(
        "ddp", title="DDP settings in our trainer", columns=COLUMNS, rows=rows, meta=meta, notes=notes,
        results_dir=args.results_dir or RESULTS_DIR,
    )  # fmt: skip
    print(md.read_text())
    return rows


if __name__ == "__main__":
    main()
