"""Validation during training: metrics on `data.val`, the best checkpoint, early stopping.

The trainer asks `due_*` after each step and epoch; when validation is due it calls `run`, which
evaluates this rank's share of the validation loader with `ValidationMetrics` (J&F for videos,
click/box mIoU for images), gathers every rank's rows, logs the scalars and overlay panel to
TensorBoard, prints one summary line on rank 0 and tells the trainer whether the score is a new
best (write `checkpoint_best.pt`) and whether to stop early. Its state (best score, patience
count) travels in the training checkpoint, so a resumed run keeps the best so far.

Configured by `trainer.validation` (all optional); the frequency in epochs is the official
`trainer.val_epoch_freq`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from training.engine.checkpointer import capture_rng_state, restore_rng_state
from training.evaluation.results import PRIMARY_METRIC, EvalResult
from training.evaluation.validation import (
    BestCheckpointTracker,
    ValidationMetrics,
    log_validation,
)

AUTO = "auto"
# The image predictor logs every image it embeds: one line per validation image is noise here.
CHATTY_LOGGERS = ("sam2.sam2_image_predictor",)


@dataclass
class ValidationConf:
    """`trainer.validation`.

    task: "video" (first-frame prompt, tracked, J&F), "image" (clicks/box, mIoU, NoC) or "auto"
        (image when the validation clips have one frame).
    prompt: first-frame prompt for videos: "mask", "box" or "click".
    metric: score that picks `checkpoint_best.pt` (null: J&F for videos, iou_1_click for images).
    metric_mode: "max" or "min" (null: "min" for NoC metrics, else "max").
    patience: stop training after this many validations without improvement (null: never).
    min_delta: an improvement must beat the best by more than this.
    every_steps: also validate every this many training steps (0: only at epoch ends).
    num_overlays: clips per rank kept for the TensorBoard overlay panel.
    save_best: write `checkpoint_best.pt` when the score improves.
    options: extra keywords for `ValidationMetrics` (e.g. correction_clicks, max_clicks).
    """

    task: str = AUTO
    prompt: str = "mask"
    metric: str | None = None
    metric_mode: str | None = None
    patience: int | None = None
    min_delta: float = 0.0
    every_steps: int = 0
    num_overlays: int = 4
    save_best: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in (AUTO, *PRIMARY_METRIC):
            raise ValueError(f"trainer.validation.task is {self.task!r}; use 'auto', 'video' or 'image'")
        if self.every_steps < 0:
            raise ValueError(f"trainer.validation.every_steps is {self.every_steps}; use 0 (off) or a step count")
        self.options = dict(self.options or {})
        if self.metric_mode is None:
            self.metric_mode = "min" if (self.metric or "").startswith("noc") else "max"


def task_of_batch(batch: Any) -> str:
    """"image" for one-frame clips (`img_batch` is `[T, B, 3, H, W]`), else "video"."""
    return "image" if batch.img_batch.shape[0] == 1 else "video"


@contextmanager
def quiet_predictors() -> Iterator[None]:
    """Raises the predictors' loggers to WARNING for the duration."""
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _tensorboard_writer(logger: Any) -> Any:
    """The SummaryWriter behind the trainer's Logger (None when TensorBoard is off or not rank 0)."""
    tb_logger = getattr(logger, "tb_logger", None)
    return None if tb_logger is None else tb_logger.writer


class ValidationHook:
    """Runs validation rounds for a `Trainer` and remembers the best score."""

    def __init__(self, conf: ValidationConf, *, dataset: Any, rank: int, device: torch.device, logger: Any, log_dir: str) -> None:
        self.conf, self.dataset, self.rank, self.device = conf, dataset, rank, device
        self.logger, self.log_dir = logger, log_dir
        self.tracker = BestCheckpointTracker(mode=conf.metric_mode, patience=conf.patience, min_delta=conf.min_delta)
        self.metric: str | None = conf.metric
        self.last_scalars: dict[str, float] = {}

    # ---- when ----------------------------------------------------------------------------

    def due_after_step(self, step: int) -> bool:
        return self.conf.every_steps > 0 and step % self.conf.every_steps == 0

    def due_after_epoch(self, *, epochs_done: int, max_epochs: int, epoch_freq: int | None, step: int) -> bool:
        """At every `epoch_freq`-th epoch, at the last one, and when a step validation falls on it."""
        by_epoch = bool(epoch_freq) and epochs_done % int(epoch_freq) == 0
        return by_epoch or epochs_done >= max_epochs or self.due_after_step(step)

    @property
    def should_stop(self) -> bool:
        return self.tracker.should_stop

    # ---- one round -----------------------------------------------------------------------

    def run(self, model: torch.nn.Module, *, epoch: float, step: int) -> bool:
        """Evaluate the validation set on every rank (a collective); True when it is a new best.

        `epoch` counts the epochs trained so far (fractional mid-epoch), `step` the training steps.

        The global RNG streams are restored afterwards, so training continues exactly as it
        would without validation (and resumes exactly from checkpoints written after it).
        """
        rng = capture_rng_state()
        start = time.time()
        try:
            with quiet_predictors():
                result = self._evaluate(model)
        finally:
            restore_rng_state(rng)
        score = self._score(result)
        improved = self.tracker.update(score, step=step)
        self._report(result, score, improved, epoch=epoch, step=step, seconds=time.time() - start)
        return improved and self.conf.save_best

    def _evaluate(self, model: torch.nn.Module) -> EvalResult:
        metrics: ValidationMetrics | None = None
        # The same clips every round: the loader of epoch 0, unshuffled in the validation config.
        for batch in self.dataset.get_loader(epoch=0):
            batch = batch.to(self.device, non_blocking=True)
            if metrics is None:
                metrics = self._make_metrics(batch)
            metrics.update(model, batch)
        if metrics is None:
            raise ValueError("trainer.data.val gives no batches on this rank; add validation data or lower its batch size")
        return metrics.compute()

    def _make_metrics(self, batch: Any) -> ValidationMetrics:
        task = task_of_batch(batch) if self.conf.task == AUTO else self.conf.task
        self.metric = self.metric or PRIMARY_METRIC[task]
        return ValidationMetrics(task=task, prompt=self.conf.prompt, num_overlays=self.conf.num_overlays, **self.conf.options)

    def _score(self, result: EvalResult) -> float:
        if self.metric not in result.summary:
            available = sorted(k for k, v in result.summary.items() if isinstance(v, float))
            raise ValueError(
                f"trainer.validation.metric is {self.metric!r}, which this {result.kind} validation does not "
                f"compute; choose one of {available}"
            )
        return float(result.summary[self.metric])

    def _report(self, result: EvalResult, score: float, improved: bool, *, epoch: float, step: int, seconds: float) -> None:
        if self.rank != 0:
            return
        writer = _tensorboard_writer(self.logger)
        if writer is not None:
            log_validation(writer, result, step)
            writer.add_scalar("Val/best", float(self.tracker.best) if self.tracker.best is not None else math.nan, step)
            writer.flush()
        self.last_scalars = {name: float(value) for name, value in result.summary.items() if isinstance(value, (int, float))}
        logging.info(self.summary_line(result, score, improved, epoch=epoch, step=step, seconds=seconds))
        with open(os.path.join(self.log_dir, "val_stats.json"), "a") as f:
            f.write(json.dumps({"epoch": round(epoch, 4), "step": step, "metric": self.metric, "score": score, **self.last_scalars}) + "\n")

    def summary_line(self, result: EvalResult, score: float, improved: bool, *, epoch: float, step: int, seconds: float) -> str:
        items = "videos" if result.kind == "video" else "images"
        count = result.summary.get(f"num_{items}", 0)
        best = self.tracker.best
        verdict = "new best" if improved else f"best {best:.4f} at step {self.tracker.best_step}" if best is not None else "no score"
        others = ", ".join(
            f"{name} {float(result.summary[name]):.4f}"
            for name in result.summary
            if name != self.metric and isinstance(result.summary[name], float) and not math.isnan(result.summary[name])
        )
        stop = f"; no improvement in {self.tracker.bad_validations} validations" if self.tracker.bad_validations else ""
        return (
            f"validation at step {step} (epoch {round(epoch, 2):g}): {self.metric} {score:.4f} ({verdict}{stop}) | {others} | "
            f"{count} {items}, {result.summary.get('num_objects', 0)} objects, {seconds:.1f}s"
        )

    # ---- checkpoint state ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain values for the training checkpoint (`weights_only` loadable)."""
        return {"metric": self.metric, **self.tracker.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved_metric = state.get("metric")
        if saved_metric is not None and self.metric is not None and saved_metric != self.metric:
            logging.warning(
                f"the checkpoint's best score is for {saved_metric!r}, this run selects by {self.metric!r}; "
                "the best score starts over"
            )
            return
        self.metric = self.metric or saved_metric
        self.tracker.load_state_dict(dict(state))
