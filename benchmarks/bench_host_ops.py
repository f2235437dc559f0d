"""The host's work in a GPU training step, without a GPU: ops dispatched per step, ours vs reference.

    python benchmarks/bench_host_ops.py                      # the GPU cases of bench_train_step.py, at 128 px
    python benchmarks/bench_host_ops.py --cases base_plus-1024px-8f --resolution 256
    python benchmarks/bench_host_ops.py --quick              # a tiny case, for CI

On an H200 the training step waited on the host (MFU 6-11 %): its time was the host dispatching
ops one by one. This counts, for each side, the ops of one training step (forward, loss,
backward) that launch kernels on a GPU, by the part of the model they run for, and the Python
calls of the step (`host_ops_probe.py` says how). Both sides build the model and loss from the
same training config (`train_config.py`), with the prompt simulation made deterministic (clicks,
no boxes or ground-truth sampling; fixed frames prompted and corrected) so that they take the
same branches. Counts do not depend on the image size as long as windows cut by padding stay so
(128 px keeps every padded window of 1024 px), so the cases run at a small size, in float32 on
the CPU, with our GPU code paths. Under bf16 autocast each side adds its casts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_memory import spec_for
from benchmarks.common import BENCH_DIR, RESULTS_DIR, probe_both_sides, ratio, write_report
from benchmarks.train_config import GPU_CASES, TrainCase

PROBE = BENCH_DIR / "host_ops_probe.py"
QUICK_CASE = TrainCase("tiny-64px-2f", "tiny", 64, num_frames=2, max_num_objects=2)
COLUMNS = [
    ("case", "case"),
    ("reference_forward_ops", "ref fwd ops"),
    ("ours_forward_ops", "ours fwd ops"),
    ("forward_ratio", "fwd ours/ref"),
    ("reference_backward_ops", "ref bwd ops"),
    ("ours_backward_ops", "ours bwd ops"),
    ("backward_ratio", "bwd ours/ref"),
    ("step_ratio", "step ops ours/ref"),
    ("reference_python_calls", "ref Python calls"),
    ("ours_python_calls", "ours Python calls"),
    ("calls_ratio", "calls ours/ref"),
    ("by_part", "fwd+bwd ops by part, ours/ref"),
    ("errors", "errors"),
]


def by_part(records: dict[str, dict[str, Any]]) -> str:
    """`part ours/ref` for each part, largest first."""
    totals = {}
    for side, record in records.items():
        for key in ("forward_ops_by_part", "backward_ops_by_part"):
            for part, ops in record[key].items():
                totals.setdefault(part, {"ours": 0, "reference": 0})[side] += ops
    ordered = sorted(totals.items(), key=lambda item: -max(item[1].values()))
    return ", ".join(f"{part} {ops['ours']}/{ops['reference']}" for part, ops in ordered)


def measure(case: TrainCase, workdir: Path, timeout: float | None) -> dict[str, Any]:
    records, errors = probe_both_sides(PROBE, spec_for(case), workdir / case.name, timeout=timeout)
    row: dict[str, Any] = {"case": case.name}
    for side, record in records.items():
        for key in ("forward_ops", "backward_ops", "python_calls"):
            row[f"{side}_{key}"] = record[key]
    if len(records) == 2:
        ours, ref = records["ours"], records["reference"]
        row["forward_ratio"] = ratio(ours["forward_ops"], ref["forward_ops"])
        row["backward_ratio"] = ratio(ours["backward_ops"], ref["backward_ops"])
        row["step_ratio"] = ratio(ours["forward_ops"] + ours["backward_ops"], ref["forward_ops"] + ref["backward_ops"])
        row["calls_ratio"] = ratio(ours["python_calls"], ref["python_calls"])
        row["by_part"] = by_part(records)
    row["errors"] = "; ".join(errors) or None
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [case.name for case in GPU_CASES]
    parser.add_argument("--cases", nargs="+", choices=names, default=names)
    parser.add_argument("--resolution", type=int, default=128, help="image size the cases run at (a multiple of 32)")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_CASE.name} (for CI)")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the children's files here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.quick:
        cases = [QUICK_CASE]
    else:
        cases = [
            dataclasses.replace(case, resolution=args.resolution, amp_dtype=None)
            for case in GPU_CASES
            if case.name in args.cases
        ]
    with tempfile.TemporaryDirectory(prefix="sam2-bench-host-ops-") as tmp:
        workdir = args.workdir or Path(tmp)
        rows = [measure(case, workdir, args.timeout) for case in cases]
    meta = {
        "command": "python benchmarks/bench_host_ops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": "CPU, float32, our GPU code paths (no GPU used)",
        "resolution": cases[0].resolution,
    }
    notes = (
        "ops: dispatched ops of one training step (after a warm-up step) that launch kernels on a GPU (not views, "
        "allocations or device queries), in forward and in backward, and Python calls of the step (cProfile). "
        "Cases keep their names; they run at the resolution above, with deterministic prompts. By part: forward "
        "ops by the top-level module running, backward ops by the module whose forward made the autograd node. "
        "In a host-bound GPU step these are the host's work; ratios below 1 favour ours."
    )
    md, _ = write_report(
        "host_ops", title="Host work per training step: ours vs reference", columns=COLUMNS, rows=rows,
        meta=meta, notes=notes, results_dir=args.results_dir or RESULTS_DIR,
    )  # fmt: skip
    print(md.read_text())
    return rows


if __name__ == "__main__":
    main()
