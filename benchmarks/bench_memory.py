"""GPU training memory without a GPU: what each side's training step holds at its peak, ours vs reference.

    python benchmarks/bench_memory.py                      # the GPU cases of bench_train_step.py
    python benchmarks/bench_memory.py --cases base_plus-1024px-8f
    python benchmarks/bench_memory.py --quick              # a tiny case, for CI

For each case, both sides build the model and loss from the same training config
(`train_config.py`, with deterministic prompts so that both take the same branches) and run the
training forward, the loss and the backward on fake CUDA tensors under CUDA autocast's rules
(`memory_probe.py` says how). The table gives the bytes still live after forward and loss (what
backward will read), the forward's peak, and the step's peak: weights and AdamW state plus the
most bytes live in forward or backward, which is what a GPU's `max_memory_allocated` reads less
the allocator's rounding. Ratios are ours/reference. The same forward also gives a proxy of the
device's work: the memory traffic and FLOPs of its ops, and the roofline time they would take on
an H100.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    BENCH_DIR,
    RESULTS_DIR,
    gib,
    probe_both_sides,
    ratio,
    reference_root,
    write_report,
)
from benchmarks.train_config import DETERMINISTIC_PROMPTS, GPU_CASES, TrainCase, model_and_loss_configs

PROBE = BENCH_DIR / "memory_probe.py"
QUICK_CASE = TrainCase("tiny-256px-2f", "tiny", 256, num_frames=2, max_num_objects=2, amp_dtype="bfloat16")
COLUMNS = [
    ("case", "case"),
    ("reference_kept_gib", "ref kept GiB"),
    ("ours_kept_gib", "ours kept GiB"),
    ("kept_ratio", "kept ours/ref"),
    ("reference_peak_gib", "ref fwd peak GiB"),
    ("ours_peak_gib", "ours fwd peak GiB"),
    ("peak_ratio", "fwd peak ours/ref"),
    ("reference_step_peak_gib", "ref step peak GiB"),
    ("ours_step_peak_gib", "ours step peak GiB"),
    ("step_peak_ratio", "step peak ours/ref"),
    ("reference_forward_ops", "ref fwd ops"),
    ("ours_forward_ops", "ours fwd ops"),
    ("ops_ratio", "fwd ops ours/ref"),
    ("reference_traffic_gib", "ref fwd traffic GiB"),
    ("ours_traffic_gib", "ours fwd traffic GiB"),
    ("reference_roofline_ms", "ref fwd roofline ms"),
    ("ours_roofline_ms", "ours fwd roofline ms"),
    ("roofline_ratio", "fwd roofline ours/ref"),
    ("ours_kept_by_part", "ours kept by part (GiB)"),
    ("reference_kept_by_part", "ref kept by part (GiB)"),
    ("errors", "errors"),
]


def spec_for(case: TrainCase) -> dict[str, Any]:
    """The resolved model and loss configs of `case`'s training config, with deterministic prompts
    (both sides take the same branches), and its batch shape."""
    model, loss = model_and_loss_configs(reference_root(), case, device="cuda")
    return {
        "model": {**model, **DETERMINISTIC_PROMPTS},
        "loss": loss,
        "frames": case.num_frames,
        "objects": case.max_num_objects,
        "resolution": case.resolution,
        "amp_dtype": case.amp_dtype,
    }


def step_peak_bytes(record: dict[str, Any]) -> int:
    """The training step's peak: weights and AdamW's two moments (held all step) plus the most
    bytes live during forward or backward (activations, gradients, transient buffers)."""
    held = record["parameter_bytes"] + 2 * record["trainable_bytes"]
    return held + max(record["forward_peak_bytes"], record["backward_peak_bytes"])


def by_part(record: dict[str, Any]) -> str:
    return ", ".join(f"{part} {size / 2**30:.2f}" for part, size in record["kept_by_part"].items() if size >= 2**24)


def measure(case: TrainCase, workdir: Path, timeout: float | None) -> dict[str, Any]:
    records, errors = probe_both_sides(PROBE, spec_for(case), workdir / case.name, timeout=timeout)
    row: dict[str, Any] = {"case": case.name}
    for side, record in records.items():
        row[f"{side}_kept_gib"] = gib(record["kept_bytes"])
        row[f"{side}_peak_gib"] = gib(record["forward_peak_bytes"])
        row[f"{side}_kept_by_part"] = by_part(record)
        row[f"{side}_step_peak_gib"] = gib(step_peak_bytes(record))
        row[f"{side}_forward_ops"] = record["forward_ops"]
        row[f"{side}_traffic_gib"] = gib(record["forward_bytes"])
        row[f"{side}_roofline_ms"] = round(record["forward_roofline_s"] * 1e3, 1)
    if len(records) == 2:
        row["kept_ratio"] = ratio(records["ours"]["kept_bytes"], records["reference"]["kept_bytes"])
        row["peak_ratio"] = ratio(records["ours"]["forward_peak_bytes"], records["reference"]["forward_peak_bytes"])
        row["step_peak_ratio"] = ratio(step_peak_bytes(records["ours"]), step_peak_bytes(records["reference"]))
        row["ops_ratio"] = ratio(records["ours"]["forward_ops"], records["reference"]["forward_ops"])
        row["roofline_ratio"] = ratio(records["ours"]["forward_roofline_s"], records["reference"]["forward_roofline_s"])
    row["errors"] = "; ".join(errors) or None
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [case.name for case in GPU_CASES]
    parser.add_argument("--cases", nargs="+", choices=names, default=names)
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_CASE.name} (for CI)")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the children's files here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    cases = [QUICK_CASE] if args.quick else [case for case in GPU_CASES if case.name in args.cases]
    with tempfile.TemporaryDirectory(prefix="sam2-bench-memory-") as tmp:
        workdir = args.workdir or Path(tmp)
        rows = [measure(case, workdir, args.timeout) for case in cases]
    meta = {
        "command": "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": "fake CUDA tensors on the CPU (no GPU used)",
    }
    notes = (
        "kept: bytes live after the training forward and the loss, i.e. the activations backward reads; fwd peak: "
        "the most bytes live during that forward; step peak: weights and AdamW state plus the most bytes live in "
        "forward or backward (run node by node), what torch.cuda.max_memory_allocated reads less the allocator's "
        "rounding. Deterministic prompts (every prompted frame clicked, fixed corrected frames). bf16 autocast "
        "with CUDA's rules; attention as the flash kernel. fwd ops: dispatched forward ops that launch kernels "
        "(not views, allocations or device queries), a proxy for the host's work in a host-bound GPU step. "
        "fwd traffic: bytes those ops read and write; fwd "
        "roofline: per op the longer of its traffic at 3.35 TB/s and its FLOPs at 989 TFLOP/s (bf16) or 67 "
        "(fp32), summed (H100 SXM peaks), a proxy for the device's work. Ratios below 1 favour ours."
    )
    md, _ = write_report(
        "memory", title="GPU training memory (fake CUDA): ours vs reference", columns=COLUMNS, rows=rows,
        meta=meta, notes=notes, results_dir=args.results_dir or RESULTS_DIR,
    )  # fmt: skip
    print(md.read_text())
    return rows


if __name__ == "__main__":
    main()
