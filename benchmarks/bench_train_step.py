"""Training step, ours vs the official trainer: same config, same data, same weights, same machine.

    python benchmarks/bench_train_step.py                 # the CPU or GPU cases for this machine
    python benchmarks/bench_train_step.py --quick         # 2 timed steps, one run per side (CI)
    python benchmarks/bench_train_step.py --cases tiny-256px-4f --repeats 3

Each run is a fresh child process executing a trainer's own `training/train.py` through
`train_probe.py`; runs alternate reference/ours/ours/reference/... so slow drift of a shared
machine hits both sides alike. Per side: seconds per step (the first `--warmup` steps of each run
are not timed), samples/s, peak memory (median over runs: RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU), model FLOPs of one step and MFU against the GPU's bf16
peak. Results go to benchmarks/results/train_step.{md,json}.

Seconds per step: on the CPU, the median over all timed steps of all runs. On a GPU, the probe
waits for the device only after the last warm-up step and after the last timed step (a trainer
that does not wait between steps keeps the device fed across them), so a run's timed window over
its steps is its time per step; the median over runs is reported.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    BENCH_DIR,
    REPO_ROOT,
    ChildFailed,
    alternating_runs,
    copy_reference_tree,
    default_device,
    gib,
    gpu_bf16_peak_flops,
    machine_info,
    median,
    ratio,
    reference_root,
    run_probe,
    write_report,
)
from benchmarks.synthetic_data import make_video_dataset
from benchmarks.train_config import CPU_CASES, GPU_CASES, TrainCase, build_train_config, write_config

PROBE = BENCH_DIR / "train_probe.py"


@dataclass
class SideResult:
    """Everything measured for one side of one case, pooled over its runs."""

    step_seconds: list[float] = field(default_factory=list)
    window_seconds: list[float] = field(default_factory=list)  # per run: synced window / steps (GPU)
    step_cpu_seconds: list[float] = field(default_factory=list)
    peak_memory: list[int] = field(default_factory=list)
    flops_per_step: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class CaseSetup:
    case: TrainCase
    workdir: Path
    ref_tree: Path
    config: dict[str, Any]  # the case's training config; each run sets its own run directory


def make_init_checkpoint(cfg: dict[str, Any], path: Path, seed: int = 0) -> Path:
    """Random weights for the case's model, built by the official code from a seed, as `{"model": sd}`."""
    from tests.reference import Reference

    Reference(reference_root()).run(
        """
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        from training.utils.train_utils import register_omegaconf_resolvers
        register_omegaconf_resolvers()
        cfg = OmegaConf.create(inputs["cfg"])
        torch.manual_seed(inputs["seed"])
        model = instantiate(cfg.trainer.model, _convert_="all")
        torch.save({"model": model.state_dict()}, inputs["path"])
        """,
        cfg=cfg,
        seed=seed,
        path=str(path),
    )
    return path


def prepare_case(case: TrainCase, workdir: Path, *, device: str, steps: int, num_workers: int) -> CaseSetup:
    """Dataset, shared initial weights and the training config for `case`, under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    ref_tree = copy_reference_tree(workdir.parent / "reference_tree")
    # Frames larger than the training resolution and not square, like real videos.
    size = (case.resolution * 3 // 4, case.resolution * 4 // 3)
    data = make_video_dataset(
        workdir / "data", num_videos=steps * case.batch_size, num_frames=case.num_frames + 2, size=size
    )
    ckpt = workdir / "init_weights.pt"
    cfg = build_train_config(
        reference_root(),
        case,
        device=device,
        img_folder=data.img_folder,
        gt_folder=data.gt_folder,
        init_checkpoint=ckpt,
        run_dir=workdir / "runs",
        num_workers=num_workers,
    )
    make_init_checkpoint(cfg, ckpt)
    return CaseSetup(case, workdir, ref_tree, cfg)


def run_once(
    setup: CaseSetup,
    side: str,
    run_index: int,
    *,
    device: str,
    steps: int,
    warmup: int,
    count_flops_at: int | None,
    threads: int | None,
    timeout: float,
    ours_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """One child run of `side`'s trainer on the case's config; returns the probe's record.

    `ours_overrides` are Hydra overrides for our trainer only (to measure a fast path on or off).
    """
    run_dir = setup.workdir / "runs" / f"{side}-{run_index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "probe.json"
    # A fresh run directory per run: both trainers auto-resume from a checkpoint found there.
    cfg = copy.deepcopy(setup.config)
    cfg["launcher"]["experiment_log_dir"] = str(run_dir / "log")
    # The official trainer finds configs only inside its own sam2/configs/ package.
    config_name = f"{setup.case.name}-{side}-{run_index}".replace("@", "_")
    if side == "reference":
        write_config(cfg, setup.ref_tree / "sam2" / "configs" / "bench" / f"{config_name}.yaml")
        script, config_arg, root = (
            setup.ref_tree / "training" / "train.py",
            f"configs/bench/{config_name}.yaml",
            setup.ref_tree,
        )
    else:
        config_arg = str(write_config(cfg, run_dir / f"{config_name}.yaml"))
        script, root = REPO_ROOT / "training" / "train.py", REPO_ROOT
    # The official train.py has no CPU switch (accelerator: cpu in the config does it, on one
    # process); ours takes --num-gpus 0 for CPU.
    num_gpus = "1" if device == "cuda" or side == "reference" else "0"
    timed_end = steps - 1 - (1 if count_flops_at is not None else 0)
    probe_args = [str(PROBE), "--out", str(out), "--sync-at", f"{warmup - 1},{timed_end}"]
    if count_flops_at is not None:
        probe_args += ["--count-flops-at", str(count_flops_at)]
    if side == "reference":
        probe_args.append("--cpu-peak-reset-noop")
    probe_args += ["--", str(script), "-c", config_arg, "--use-cluster", "0", "--num-gpus", num_gpus]
    if side == "ours":
        probe_args += list(ours_overrides)
    record = run_probe(probe_args, side=side, root=root, run_dir=run_dir, out=out, threads=threads, timeout=timeout)
    if len(record["step_times"]) < steps:
        raise ChildFailed(
            f"{side} ran {len(record['step_times'])} steps, expected {steps}; log: {run_dir / 'output.log'}"
        )
    return record


def collect(record: dict[str, Any], result: SideResult, *, warmup: int, iters: int) -> None:
    """Adds one run's timed step durations, peak memory and FLOPs to `result`."""
    times = record["step_times"]
    # Step k lasts from the end of step k-1 to its own end; steps 0..warmup-1 are not timed.
    result.step_seconds += [times[k] - times[k - 1] for k in range(warmup, warmup + iters)]
    first, last = warmup - 1, warmup + iters - 1
    if {first, last} <= set(record.get("synced_steps", [])):  # a GPU run: the window is what counts
        result.window_seconds.append((times[last] - times[first]) / iters)
    cpu = record.get("cpu_times") or []
    if len(cpu) >= warmup + iters:
        result.step_cpu_seconds += [cpu[k] - cpu[k - 1] for k in range(warmup, warmup + iters)]
    result.peak_memory.append(max(record["peak_memory"][: warmup + iters]))
    if record.get("flops_per_step"):
        result.flops_per_step.append(float(record["flops_per_step"]))


def summarize(case: TrainCase, results: dict[str, SideResult], *, peak_flops: float | None) -> dict[str, Any]:
    """One report row: per-side medians and the ours/reference ratios."""
    row: dict[str, Any] = {"case": case.name}
    for side, result in results.items():
        timed = result.window_seconds or result.step_seconds
        s_iter = median(timed) if timed else None
        flops = median(result.flops_per_step) if result.flops_per_step else None
        row[f"{side}_s_per_iter"] = s_iter
        row[f"{side}_cpu_s_per_iter"] = median(result.step_cpu_seconds) if result.step_cpu_seconds else None
        row[f"{side}_samples_per_s"] = case.batch_size / s_iter if s_iter else None
        row[f"{side}_peak_gib"] = gib(median(result.peak_memory)) if result.peak_memory else None
        row[f"{side}_gflop_per_step"] = flops / 1e9 if flops else None
        row[f"{side}_mfu"] = flops / s_iter / peak_flops if flops and s_iter and peak_flops else None
        row[f"{side}_steps_timed"] = len(result.step_seconds)
        # Every timed step, run after run (JSON only): with few steps, the median hides outliers,
        # and both sides see the same clips in the same order, so steps can be compared in pairs.
        row[f"{side}_step_seconds"] = [round(t, 4) for t in result.step_seconds]
        row[f"{side}_errors"] = "; ".join(e.splitlines()[0] for e in result.errors) or None
    row["errors"] = (
        "; ".join(f"{side}: {row[f'{side}_errors']}" for side in results if row.get(f"{side}_errors")) or None
    )
    row["time_ratio"] = ratio(row.get("ours_s_per_iter"), row.get("reference_s_per_iter"))
    row["cpu_time_ratio"] = ratio(row.get("ours_cpu_s_per_iter"), row.get("reference_cpu_s_per_iter"))
    row["memory_ratio"] = ratio(row.get("ours_peak_gib"), row.get("reference_peak_gib"))
    return row


COLUMNS = [
    ("case", "case"),
    ("reference_s_per_iter", "ref s/iter"),
    ("ours_s_per_iter", "ours s/iter"),
    ("time_ratio", "time ours/ref"),
    ("reference_cpu_s_per_iter", "ref CPU s/iter"),
    ("ours_cpu_s_per_iter", "ours CPU s/iter"),
    ("cpu_time_ratio", "CPU time ours/ref"),
    ("reference_peak_gib", "ref peak GiB"),
    ("ours_peak_gib", "ours peak GiB"),
    ("memory_ratio", "mem ours/ref"),
    ("reference_samples_per_s", "ref samples/s"),
    ("ours_samples_per_s", "ours samples/s"),
    ("reference_gflop_per_step", "ref GFLOP/step"),
    ("ours_gflop_per_step", "ours GFLOP/step"),
    ("reference_mfu", "ref MFU"),
    ("ours_mfu", "ours MFU"),
    ("errors", "errors"),
]


def run_case(case: TrainCase, workdir: Path, args: argparse.Namespace, device: str) -> dict[str, Any]:
    steps = args.warmup + args.iters + (1 if args.flops else 0)
    setup = prepare_case(case, workdir, device=device, steps=steps, num_workers=args.workers)
    records, errors = alternating_runs(
        case.name,
        args.sides,
        args.repeats,
        partial(
            run_once,
            setup,
            device=device,
            steps=steps,
            warmup=args.warmup,
            count_flops_at=args.warmup + args.iters if args.flops else None,
            threads=args.threads,
            timeout=args.timeout,
            ours_overrides=args.ours_overrides,
        ),
    )
    results = {side: SideResult(errors=errors[side]) for side in args.sides}
    for side, side_records in records.items():
        for record in side_records:
            collect(record, results[side], warmup=args.warmup, iters=args.iters)
    peak_flops = gpu_bf16_peak_flops(machine_info(device).get("gpu", "")) if device == "cuda" else None
    return summarize(case, results, peak_flops=peak_flops)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default: this device's set)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run (>= 1)")
    parser.add_argument("--iters", type=int, default=6, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating")
    parser.add_argument("--workers", type=int, default=None, help="data-loader workers (default: 0 on CPU, 8 on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides")
    parser.add_argument(
        "--ours-overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides for our trainer only, e.g. a fast path switched on (shown in the report)",
    )
    parser.add_argument("--sides", nargs="+", default=["reference", "ours"], choices=["reference", "ours"])
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP-counted step")
    parser.add_argument("--quick", action="store_true", help="CI mode: 1 warm-up, 2 timed steps, 1 run per side")
    parser.add_argument("--resolution", type=int, default=None, help="override every case's resolution")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data, configs and logs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.iters, args.repeats = 1, 2, 1
    if args.warmup < 1 or args.iters < 1:
        raise SystemExit(f"--warmup must be >= 1 and --iters >= 1 (got {args.warmup}, {args.iters})")
    return args


def select_cases(args: argparse.Namespace, device: str) -> list[TrainCase]:
    known = {case.name: case for case in CPU_CASES + GPU_CASES}
    default = CPU_CASES if device == "cpu" else GPU_CASES
    names = args.cases or [case.name for case in default]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(known)}")
    cases = [known[name] for name in names]
    if args.resolution:
        cases = [replace(c, name=f"{c.name}@{args.resolution}px", resolution=args.resolution) for c in cases]
    if device == "cpu":
        # bf16 autocast is a GPU setting here; CPU cases train in float32 like the official CPU path.
        cases = [replace(c, amp_dtype=None) for c in cases]
    return cases


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = args.device or default_device()
    if args.workers is None:
        args.workers = 0 if device == "cpu" else 8
    cases = select_cases(args, device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sam2-bench-train-") as tmp:
        base = args.workdir or Path(tmp)
        for case in cases:
            rows.append(run_case(case, base / case.name.replace("@", "_"), args, device))
    meta = machine_info(device) | {
        "command": "python benchmarks/bench_train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "warmup_steps": args.warmup,
        "timed_steps_per_run": args.iters,
        "runs_per_side": args.repeats,
        "data_loader_workers": args.workers,
        "threads_per_side": args.threads or "torch default",
        "ours_overrides": " ".join(args.ours_overrides) or None,
    }
    notes = (
        "s/iter: wall time between optimizer steps, data loading included: on CPU the median over all timed "
        "steps; on GPU, per run, the timed window (the device waited for only at its ends) over its steps, "
        "median over runs. CPU s/iter: the training process's CPU time (all threads) per step, the steadier "
        "number on a shared machine; on GPU it is host overhead. Peak: CPU = peak RSS of the training "
        "process, GPU = torch.cuda.max_memory_allocated. "
        "Ratios are ours/reference: below 1 is better."
    )
    md, _ = write_report(
        "train_step",
        title="Training step: ours vs reference",
        columns=COLUMNS,
        rows=rows,
        meta=meta,
        notes=notes,
        results_dir=args.results_dir,
    )
    print(md.read_text())
    return rows


if __name__ == "__main__":
    main()
