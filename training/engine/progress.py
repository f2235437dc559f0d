"""What a run tells its user: the start banner, per-step progress, TensorBoard scalars, summaries.

Only rank 0 prints and writes scalars; every rank keeps its text log (see `setup_logging`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from training.utils.train_utils import human_readable_time


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last call, in GB (None on CPU)."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def format_banner(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = ["=" * 72, "SAM 2 training"] + [f"  {name:<{width}}  {value}" for name, value in rows] + ["=" * 72]
    return "\n".join(lines)


class EpochMeter:
    """Averages of the loss parts, timings and throughput over one epoch.

    The loss sums stay on the device until `averages` reads them, so a step need not wait for it.
    Batches whose loss is not finite (their updates were skipped) are left out of the averages.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = defaultdict(float)
        self.finite_samples: Tensor | float = 0.0
        self.samples = 0
        self.steps = 0
        self.data_seconds = 0.0
        self.step_seconds = 0.0

    def update(self, losses: Mapping[str, Tensor], batch_size: int, data_seconds: float, step_seconds: float) -> None:
        if "loss" in losses:
            finite = torch.isfinite(losses["loss"])
            for name, value in losses.items():
                self.sums[name] = self.sums[name] + torch.where(finite, value * batch_size, 0.0)
            self.finite_samples = self.finite_samples + finite * batch_size
        self.samples += batch_size
        self.steps += 1
        self.data_seconds += data_seconds
        self.step_seconds += step_seconds

    def averages(self) -> dict[str, float]:
        counted = max(float(self.finite_samples), 1.0)
        return {name: float(total) / counted for name, total in self.sums.items()}


class ReportWindow:
    """Samples and data-loading time since the last report, for rates that include the device's time."""

    def __init__(self) -> None:
        self.start, self.samples, self.data_seconds = time.time(), 0, 0.0

    def add(self, samples: int, data_seconds: float) -> None:
        self.samples += samples
        self.data_seconds += data_seconds

    def rates(self) -> tuple[float, float]:
        """(samples per second, share of the time spent waiting for data); call after reading a result."""
        seconds = max(time.time() - self.start, 1e-9)
        return self.samples / seconds, self.data_seconds / seconds


class ProgressReporter:
    """Progress of the training phase on rank 0: lines or a tqdm bar, scalars, ETA."""

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        tb_logger: Any,
        log_freq: int,
        scalar_freq: int,
        device: torch.device,
        total_steps: int,
    ) -> None:
        self.is_main = rank == 0
        self.world_size = world_size
        self.tb = tb_logger
        self.log_freq = max(1, log_freq)
        self.scalar_freq = max(1, scalar_freq)
        self.device = device
        self.total_steps = total_steps
        self.use_bar = self.is_main and sys.stdout.isatty()
        self.bar = None
        self.epoch_meter = EpochMeter()
        self._window_start = time.time()
        self._window_steps = 0
        self.since_report = ReportWindow()

    def start_epoch(self, epoch: int, max_epochs: int, steps_in_epoch: int, first_batch: int) -> None:
        self.epoch_meter = EpochMeter()
        self.epoch, self.max_epochs, self.steps_in_epoch = epoch, max_epochs, steps_in_epoch
        self._window_start, self._window_steps = time.time(), 0
        self.since_report = ReportWindow()
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=steps_in_epoch, initial=first_batch, desc=f"epoch {epoch + 1}/{max_epochs}")

    def reports_at(self, global_step: int) -> bool:
        """Whether `step` writes a line or scalars at this step (the same answer on every rank)."""
        return global_step % self.log_freq == 0 or global_step % self.scalar_freq == 0 or global_step == 1

    def step(
        self,
        *,
        global_step: int,
        batch_in_epoch: int,
        losses: Mapping[str, Tensor],
        batch_size: int,
        data_seconds: float,
        step_seconds: float,
        lrs: Sequence[float],
        grad_norm: Tensor | None,
    ) -> None:
        """Records one finished training step (`global_step` counts from 1).

        The losses and gradient norm are read (which waits for the device) only where a line or
        scalars are written; rates there cover every step since the last such point.
        """
        self.epoch_meter.update(losses, batch_size, data_seconds, step_seconds)
        self._window_steps += 1
        self.since_report.add(batch_size * self.world_size, data_seconds)
        if self.bar is not None:
            self.bar.update(1)
        if not self.is_main or not self.reports_at(global_step):
            return
        values = {name: float(value) for name, value in losses.items()}
        norm = None if grad_norm is None else float(grad_norm)
        samples_per_s, data_share = self.since_report.rates()
        self.since_report = ReportWindow()
        memory = peak_memory_gb(self.device)
        if global_step % self.scalar_freq == 0 or global_step == 1:
            self._write_scalars(global_step, values, lrs, norm, samples_per_s, data_share, memory)
        if global_step % self.log_freq == 0 or global_step == 1:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", lr=f"{lrs[0]:.2e}" if lrs else "-")
            else:
                logging.info(self._line(global_step, batch_in_epoch, values, lrs, samples_per_s, data_share, memory))

    def _eta_seconds(self, global_step: int) -> float:
        elapsed = time.time() - self._window_start
        per_step = elapsed / max(self._window_steps, 1)
        return per_step * max(self.total_steps - global_step, 0)

    def _line(self, global_step, batch_in_epoch, losses, lrs, samples_per_s, data_share, memory) -> str:
        parts = [f"epoch {self.epoch + 1}/{self.max_epochs}", f"step {batch_in_epoch}/{self.steps_in_epoch}"]
        parts += [f"{name} {value:.4f}" for name, value in losses.items()]
        parts += [f"lr {lrs[0]:.3e}" if lrs else "lr -", f"{samples_per_s:.2f} samples/s", f"data {data_share:.0%}"]
        if memory is not None:
            parts.append(f"mem {memory:.2f} GB")
        parts.append(f"ETA {human_readable_time(self._eta_seconds(global_step))}")
        return " | ".join(parts)

    def _write_scalars(self, step, losses, lrs, grad_norm, samples_per_s, data_share, memory) -> None:
        for name, value in losses.items():
            self.tb.log(f"Losses/train_{name}", value, step)
        for group, lr in enumerate(lrs):
            self.tb.log(f"Optim/lr_group{group}", lr, step)
        if grad_norm is not None:
            self.tb.log("Optim/grad_norm", grad_norm, step)
        self.tb.log("Step_Stats/train/samples_per_s", samples_per_s, step)
        self.tb.log("Step_Stats/train/data_time_share", data_share, step)
        if memory is not None:
            self.tb.log("Step_Stats/train/peak_mem_gb", memory, step)

    def end_epoch(self, global_step: int) -> dict[str, float]:
        """Closes the bar, logs and returns the epoch's averages."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        meter = self.epoch_meter
        summary = {f"Losses/train_{k}": v for k, v in meter.averages().items()}
        summary["Trainer/steps_train"] = global_step
        summary["Trainer/epoch_seconds"] = meter.step_seconds
        if self.is_main:
            averages = ", ".join(f"{k} {v:.4f}" for k, v in meter.averages().items())
            logging.info(
                f"epoch {self.epoch + 1}/{self.max_epochs} done: {meter.steps} steps in "
                f"{human_readable_time(meter.step_seconds)}, "
                f"{meter.samples * self.world_size / max(meter.step_seconds, 1e-9):.2f} samples/s; {averages}"
            )
        return summary
