"""Metrics during training: J&F / mIoU over the validation batches, best-checkpoint tracking.

The trainer's validation loop feeds each batch it already loads (`data.val`) to a
`ValidationMetrics`, then asks for the result once per validation round:

    metrics = ValidationMetrics(task="video", prompt="mask")
    for batch in val_loader:
        metrics.update(model, batch)        # this rank's batches
    result = metrics.compute()              # every rank gets the gathered, de-duplicated result
    log_validation(tb_writer, result, step=epoch)
    if tracker.update(result.score): save checkpoint_best.pt
    if tracker.should_stop: stop training

Prompts are deterministic (derived from the ground truth, no randomness), so numbers compare
across runs, checkpoints and world sizes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sam2.sam2_image_predictor import SAM2ImagePredictor
from training.evaluation.image_eval import evaluate_image_clip
from training.evaluation.overlays import overlay_grid
from training.evaluation.report import metric_columns
from training.evaluation.results import EvalResult, gather_rows, summarize_image_rows, summarize_video_rows
from training.evaluation.samples import clips_from_batch
from training.evaluation.video_eval import VIDEO_PROMPTS, evaluate_video_clip

TASKS = ("video", "image")


# The keywords each task's evaluation takes; a config may carry both sets (its task can be "auto").
TASK_OPTIONS = {
    "video": {"skip_first_and_last", "bound_th", "autocast_dtype"},
    "image": {"correction_clicks", "max_clicks", "noc_thresholds", "feed_previous_mask"},
}


class ValidationMetrics:
    """Accumulates per-object rows over one validation round.

    Args:
        task: "video" (first-frame prompt, tracked, J&F) or "image" (box / clicks, mIoU, NoC).
        prompt: first-frame prompt for videos: "mask", "box" or "click".
        num_overlays: clips kept (on each rank) for the overlay panel.
        **kwargs: for videos `skip_first_and_last`, `bound_th`, `autocast_dtype`; for images
            `correction_clicks`, `max_clicks`, `noc_thresholds`, `feed_previous_mask`. Those of
            the other task are ignored.
    """

    def __init__(self, *, task: str = "video", prompt: str = "mask", num_overlays: int = 4, **kwargs: Any) -> None:
        if task not in TASKS:
            raise ValueError(f"validation task must be one of {TASKS}, got {task!r}")
        if prompt not in VIDEO_PROMPTS:
            raise ValueError(f"validation prompt must be one of {VIDEO_PROMPTS}, got {prompt!r}")
        unknown = set(kwargs) - set().union(*TASK_OPTIONS.values())
        if unknown:
            raise ValueError(
                f"unknown validation option(s) {sorted(unknown)}; video options: {sorted(TASK_OPTIONS['video'])}, "
                f"image options: {sorted(TASK_OPTIONS['image'])}"
            )
        task_kwargs = {k: v for k, v in kwargs.items() if k in TASK_OPTIONS[task]}
        self.task, self.prompt, self.num_overlays, self.kwargs = task, prompt, num_overlays, task_kwargs
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.samples: list = []

    def update(self, model: torch.nn.Module, batch) -> None:
        """Evaluate the clips of a `BatchedVideoDatapoint` (DDP-wrapped models are unwrapped)."""
        model = getattr(model, "module", model)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for clip in clips_from_batch(batch):
                    keep = len(self.samples) < self.num_overlays
                    if self.task == "video":
                        rows, sample = evaluate_video_clip(
                            model, clip, prompt=self.prompt, keep_prediction=keep, **self.kwargs
                        )
                    else:
                        predictor = SAM2ImagePredictor(model)
                        rows, sample = evaluate_image_clip(predictor, clip, keep_prediction=keep, **self.kwargs)
                    self.rows.extend(rows)
                    self.samples.extend([sample] if sample is not None else [])
        finally:
            model.train(was_training)

    def compute(self) -> EvalResult:
        """The round's result from all ranks' rows (a collective: call it on every rank)."""
        rows = gather_rows(self.rows)
        if self.task == "video":
            objects, items, summary = summarize_video_rows(rows)
            summary["prompt"] = self.prompt
        else:
            objects, items, summary = summarize_image_rows(rows)
        return EvalResult(kind=self.task, objects=objects, items=items, summary=summary, samples=list(self.samples))


def validation_scalars(result: EvalResult, *, prefix: str = "Val") -> dict[str, float]:
    """`{"<prefix>/<metric>": value}` of the result's overall metrics (NaN-free)."""
    scalars = {}
    for metric in metric_columns(result):
        value = result.summary.get(metric, math.nan)
        if value is not None and not math.isnan(float(value)):
            scalars[f"{prefix}/{metric}"] = float(value)
    return scalars


def log_validation(
    writer, result: EvalResult, step: int, *, prefix: str = "Val", max_overlays: int = 4
) -> dict[str, float]:
    """Write the metrics as scalars and, when there are samples, an overlay image panel.

    `writer` is a `torch.utils.tensorboard.SummaryWriter` (or anything with `add_scalar`, and
    `add_image` for the panel). Returns the scalars written.
    """
    scalars = validation_scalars(result, prefix=prefix)
    for name, value in scalars.items():
        writer.add_scalar(name, value, step)
    if result.samples and hasattr(writer, "add_image"):
        writer.add_image(f"{prefix}/overlays", overlay_grid(result.samples[:max_overlays]), step, dataformats="HWC")
    return scalars


class BestCheckpointTracker:
    """Remembers the best validation score; says when to save `checkpoint_best.pt` and when to stop.

    Args:
        mode: "max" (J&F, mIoU) or "min" (NoC).
        patience: stop after this many validations without improvement (None: never).
        min_delta: an improvement must beat the best by more than this.
    """

    def __init__(self, *, mode: str = "max", patience: int | None = None, min_delta: float = 0.0) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 validations (or None to never stop), got {patience}")
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_validations = 0

    def update(self, value: float, step: int | None = None) -> bool:
        """Record one validation's score; True when it is a new best (save the checkpoint)."""
        if value is None or math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        else:
            improved = value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        if improved:
            self.best, self.best_step, self.bad_validations = float(value), step, 0
        else:
            self.bad_validations += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_validations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Plain values, safe for a `weights_only=True` checkpoint."""
        return {"best": self.best, "best_step": self.best_step, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad_validations = int(state.get("bad_validations", 0))
