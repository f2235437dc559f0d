"""Child-process launcher: runs a trainer's `train.py` unmodified and records every optimizer step.

    python benchmarks/train_probe.py --out probe.json [--cpu-peak-reset-noop] [--count-flops-at N] \
        -- path/to/training/train.py -c <config> --use-cluster 0 --num-gpus 1

Instrumentation comes from outside the trainer, identically for ours and the reference:
- a global optimizer step post-hook (`torch.optim.optimizer.register_optimizer_step_post_hook`)
  stamps the wall clock and the process's CPU time after each step and reads peak memory
  (`torch.cuda.max_memory_allocated`, which the official trainer resets after every step, so the
  reading covers that step; on CPU the process's peak RSS). On a GPU it first waits for the
  device after every step, or, with `--sync-at`, only after the listed steps: a trainer that never
  waits for the device between steps (ours) queues the next step's work while the last one runs,
  and a wait after every step would take that from it. Time the steps between two synced ones;
- optionally one step is run under `torch.utils.flop_counter.FlopCounterMode` (entered after step
  N-1, left after step N) to count the model FLOPs of a training step; that step's time is not used;
- `--cpu-peak-reset-noop` replaces `torch.cuda.reset_peak_memory_stats`, the official trainer's one
  CUDA-only call, by a no-op so that trainer runs on a CPU-only machine.
The record is rewritten after every step, so a crash still leaves the steps done so far.
This file imports only torch and the standard library: it must not pick a side's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.flop_counter import FlopCounterMode


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class StepRecorder:
    """The optimizer step post-hook: one record per training step of the first optimizer seen."""

    def __init__(self, out_path: str, count_flops_at: int | None, sync_at: set[int] | None = None) -> None:
        self.out_path = out_path
        self.count_flops_at = count_flops_at
        self.sync_at = sync_at  # None: after every step
        self.optimizer_id: int | None = None
        self.flop_counter: FlopCounterMode | None = None
        self.record: dict = {
            "step_times": [],
            "cpu_times": [],
            "peak_memory": [],
            "flops_per_step": None,
            "flop_step": None,
            "synced_steps": [],
        }

    def __call__(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        # Trainers with several optimizers step them all per iteration; count iterations once.
        if self.optimizer_id is None:
            self.optimizer_id = id(optimizer)
        if id(optimizer) != self.optimizer_id:
            return
        on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
        step = len(self.record["step_times"])  # 0-based index of the step that just finished
        if on_gpu and (self.sync_at is None or step in self.sync_at):
            torch.cuda.synchronize()
            self.record["synced_steps"].append(step)
        now = time.perf_counter()
        if self.flop_counter is not None:
            self.flop_counter.__exit__(None, None, None)
            self.record["flops_per_step"] = self.flop_counter.get_total_flops()
            self.record["flop_step"] = step
            self.flop_counter = None
        self.record["step_times"].append(now)
        # CPU seconds of this process (all its threads): on a shared machine, less disturbed by
        # other processes than wall time.
        self.record["cpu_times"].append(time.process_time())
        self.record["peak_memory"].append(int(torch.cuda.max_memory_allocated()) if on_gpu else _peak_rss_bytes())
        if step == 0:
            self.record["device"] = torch.cuda.get_device_name() if on_gpu else "cpu"
            self.record["modules"] = {
                name: getattr(sys.modules.get(name), "__file__", None) or "" for name in ("sam2", "training")
            }
        self._save()
        if self.count_flops_at is not None and step + 1 == self.count_flops_at:
            self.flop_counter = FlopCounterMode(display=False)
            self.flop_counter.__enter__()

    def _save(self) -> None:
        tmp = f"{self.out_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.record, f)
        os.replace(tmp, self.out_path)


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: train_probe.py --out FILE [options] -- TRAIN_SCRIPT [ARGS...]")
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu-peak-reset-noop", action="store_true")
    parser.add_argument("--count-flops-at", type=int, default=None, help="0-based step to count FLOPs on")
    parser.add_argument("--sync-at", default=None, help="0-based steps (comma list) after which to wait for the GPU")
    args = parser.parse_args(argv[:split])
    script, *script_args = argv[split + 1 :]

    if args.cpu_peak_reset_noop and not torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    sync_at = None if args.sync_at is None else {int(step) for step in args.sync_at.split(",")}
    # Under torchrun every rank runs this probe: `{rank}` in --out names each rank's record.
    recorder = StepRecorder(args.out.format(rank=os.environ.get("RANK", "0")), args.count_flops_at, sync_at)
    register_optimizer_step_post_hook(recorder)
    recorder.record["start_time"] = time.perf_counter()

    sys.argv = [script, *script_args]
    # train.py fixes sys.path[0] when run as a script; give it the path it would see.
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    recorder.record["end_time"] = time.perf_counter()
    recorder._save()


if __name__ == "__main__":
    main()
