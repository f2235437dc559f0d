"""Evaluation results: per-object rows gathered from every rank, per-item and overall means.

Overall numbers are means over objects (as DAVIS reports J&F), computed from the gathered rows
after removing duplicates, so they do not depend on how items were split across ranks (a
`DistributedSampler` repeats items to even out the shards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pandas loads on first use: a training run that never evaluates skips it (~30 MB)
    import pandas as pd

VIDEO_METRICS = ("J&F", "J", "F", "J_recall", "F_recall", "J_decay", "F_decay")
PRIMARY_METRIC = {"video": "J&F", "image": "iou_1_click"}


@dataclass
class EvalResult:
    """What an evaluation produced.

    kind: "video" or "image".
    objects: one row per (item, object), the finest level.
    items: one row per video / image (mean over its objects).
    summary: overall means over objects plus counts (and the prompt settings).
    samples: `OverlaySample`s kept for overlays, this rank's first few.
    """

    kind: str
    objects: pd.DataFrame
    items: pd.DataFrame
    summary: dict[str, Any]
    samples: list = field(default_factory=list)

    @property
    def primary_metric(self) -> str:
        """Name of the headline number: J&F for videos, 1-click mIoU for images."""
        return PRIMARY_METRIC[self.kind]

    @property
    def score(self) -> float:
        """The headline number (higher is better), e.g. to select the best checkpoint."""
        return float(self.summary[self.primary_metric])


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' rows, on every rank (unchanged without an initialised process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    if torch.distributed.get_world_size() == 1:
        return rows
    gathered: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered for row in (part or [])]


def _object_table(rows: list[dict[str, Any]], item_key: str) -> pd.DataFrame:
    """Rows as a DataFrame, one per (item, object), sorted; duplicates (padding) dropped."""
    import pandas as pd

    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.drop_duplicates(subset=[item_key, "object_id"], keep="first")
    return table.sort_values([item_key, "object_id"], kind="stable").reset_index(drop=True)


def _item_table(objects: pd.DataFrame, item_key: str, metrics: list[str]) -> pd.DataFrame:
    if objects.empty:
        return objects
    grouped = objects.groupby(item_key, sort=True)
    items = grouped[metrics].mean()
    items.insert(0, "num_objects", grouped.size())
    return items.reset_index()


def _mean(objects: pd.DataFrame, column: str) -> float:
    if objects.empty or column not in objects:
        return math.nan
    return float(objects[column].mean())


def summarize_video_rows(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(objects, videos, summary) for video rows from `video_eval.score_clip`."""
    objects = _object_table(rows, "video")
    videos = _item_table(objects, "video", list(VIDEO_METRICS))
    summary: dict[str, Any] = {name: _mean(objects, name) for name in VIDEO_METRICS}
    # DAVIS: J&F is the mean of the two object-averaged means (the same as averaging J&F).
    summary["J&F"] = (summary["J"] + summary["F"]) / 2
    summary["num_videos"] = 0 if objects.empty else int(objects["video"].nunique())
    summary["num_objects"] = len(objects)
    return objects, videos, summary


def image_metric_columns(objects: pd.DataFrame) -> list[str]:
    """The metric columns of image rows (IoUs after each prompt, NoC)."""
    return [c for c in objects.columns if c.startswith(("iou_", "noc_"))]


def summarize_image_rows(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(objects, images, summary) for image rows from `image_eval.evaluate_image_object`."""
    objects = _object_table(rows, "image")
    metrics = image_metric_columns(objects)
    images = _item_table(objects, "image", metrics)
    summary: dict[str, Any] = {name: _mean(objects, name) for name in metrics}
    summary["num_images"] = 0 if objects.empty else int(objects["image"].nunique())
    summary["num_objects"] = len(objects)
    return objects, images, summary
