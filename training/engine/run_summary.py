"""The end of a run, on rank 0: a picture of the final model's predictions and where to look next.

    training finished: epoch 4/4, 16 steps
      checkpoint   sam2_logs/quickstart/checkpoints/checkpoint.pt
      best         sam2_logs/quickstart/checkpoints/checkpoint_best.pt (iou_1_click 0.6120 at step 12)
      tensorboard  tensorboard --logdir sam2_logs/quickstart/tensorboard
      predictions  sam2_logs/quickstart/predictions.png
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from PIL import Image

from training.engine.validation_hook import quiet_predictors, task_of_batch
from training.evaluation.overlays import OverlaySample, overlay_grid
from training.evaluation.validation import ValidationMetrics

PICTURE_NAME = "predictions.png"
# Cheap settings: the picture shows the first prompt's prediction, not a full click session.
IMAGE_PICTURE_OPTIONS = {"correction_clicks": 0, "max_clicks": 1, "noc_thresholds": ()}


def prediction_samples(
    model: torch.nn.Module, batches: Iterable[Any], *, device: torch.device, num_samples: int, prompt: str = "mask"
) -> list[OverlaySample]:
    """Overlays (image + prompt | ground truth | prediction) of the first `num_samples` clips."""
    metrics: ValidationMetrics | None = None
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        if metrics is None:
            task = task_of_batch(batch)
            options = IMAGE_PICTURE_OPTIONS if task == "image" else {}
            metrics = ValidationMetrics(task=task, prompt=prompt, num_overlays=num_samples, **options)
        metrics.update(model, batch)
        if len(metrics.samples) >= num_samples:
            break
    return [] if metrics is None else metrics.samples[:num_samples]


def write_prediction_picture(
    model: torch.nn.Module,
    batches: Iterable[Any],
    path: str,
    *,
    device: torch.device,
    num_samples: int = 4,
    prompt: str = "mask",
) -> str | None:
    """Writes one PNG with a row per sample; returns its path (None when there was nothing to draw).

    Runs on one rank only, without collectives (it never calls `ValidationMetrics.compute`).
    """
    with quiet_predictors():
        samples = prediction_samples(model, batches, device=device, num_samples=num_samples, prompt=prompt)
    if not samples:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(overlay_grid(samples)).save(path)
    return path


def format_run_summary(headline: str, rows: Sequence[tuple[str, str | None]]) -> str:
    """The closing block: a headline, then `name  value` rows (rows without a value are left out)."""
    shown = [(name, value) for name, value in rows if value]
    width = max((len(name) for name, _ in shown), default=0)
    return "\n".join([headline] + [f"  {name:<{width}}  {value}" for name, value in shown])


def log_run_summary(headline: str, rows: Sequence[tuple[str, str | None]]) -> None:
    logging.info(format_run_summary(headline, rows))
