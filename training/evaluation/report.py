"""Reporting evaluation results: CSV files, terminal tables, two checkpoints side by side.

One CSV per run holds every level, told apart by the `level` column: `object` rows (one per
video/image and object), `video` or `image` rows (means over their objects) and one `overall`
row (means over all objects, as DAVIS reports).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from training.evaluation.results import VIDEO_METRICS, EvalResult, image_metric_columns

if TYPE_CHECKING:  # pandas loads on first use: a training run that never evaluates skips it (~30 MB)
    import pandas as pd

ITEM_KEY = {"video": "video", "image": "image"}


def metric_columns(result: EvalResult) -> list[str]:
    """The metric columns of a result, headline metric first."""
    if result.kind == "video":
        return list(VIDEO_METRICS)
    columns = image_metric_columns(result.objects) if not result.objects.empty else []
    primary = [c for c in columns if c == result.primary_metric]
    return primary + [c for c in columns if c != result.primary_metric]


def result_table(result: EvalResult) -> pd.DataFrame:
    """All levels of a result in one table (the CSV's content)."""
    import pandas as pd

    key = ITEM_KEY[result.kind]
    metrics = metric_columns(result)
    objects = result.objects.assign(level="object")
    items = result.items.assign(level=result.kind)
    overall = {"level": "overall", key: "ALL", "num_objects": result.summary.get("num_objects", 0)}
    overall.update({m: result.summary.get(m, math.nan) for m in metrics})
    table = pd.concat([objects, items, pd.DataFrame([overall])], ignore_index=True)
    leading = ["level", key, "object_id", "num_objects"]
    ordered = [c for c in leading if c in table] + metrics
    return table[ordered + [c for c in table.columns if c not in ordered]]


def write_csv(result: EvalResult, path: str | os.PathLike) -> str:
    """Write the run's table to `path` (folders created); returns the path."""
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    result_table(result).to_csv(path, index=False)
    return os.fspath(path)


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A table written by `write_csv`."""
    import pandas as pd

    return pd.read_csv(path)


def format_result(result: EvalResult, *, title: str = "", max_items: int = 30) -> str:
    """Terminal text: the overall numbers, then one line per video / image."""
    metrics = metric_columns(result)
    num_items, num_objects = result.summary.get(f"num_{result.kind}s", 0), result.summary.get("num_objects", 0)
    counts = f"{num_items} {result.kind}s, {num_objects} objects"
    lines = [f"{title + ': ' if title else ''}{counts}"]
    lines.append("  ".join(f"{m} {result.summary.get(m, math.nan):.4f}" for m in metrics))
    if not result.items.empty:
        shown = result.items.head(max_items)
        lines.append(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if len(result.items) > max_items:
            lines.append(f"... {len(result.items) - max_items} more in the CSV")
    return "\n".join(lines)


def compare_results(results: Mapping[str, EvalResult]) -> pd.DataFrame:
    """Overall metrics of two runs side by side, with the difference (second minus first).

    Rows are metrics; columns are the two run names and `difference`.
    """
    import pandas as pd

    if len(results) != 2:
        raise ValueError(f"compare_results takes exactly two runs, got {len(results)}: {list(results)}")
    (name_a, a), (name_b, b) = results.items()
    if a.kind != b.kind:
        raise ValueError(f"cannot compare a {a.kind} evaluation ({name_a}) with a {b.kind} one ({name_b})")
    metrics = [m for m in metric_columns(a) if m in metric_columns(b)]
    table = pd.DataFrame(
        {
            name_a: [a.summary.get(m, math.nan) for m in metrics],
            name_b: [b.summary.get(m, math.nan) for m in metrics],
        },
        index=metrics,
    )
    table["difference"] = table[name_b] - table[name_a]
    table.index.name = "metric"
    return table


def compare_items(results: Mapping[str, EvalResult]) -> pd.DataFrame:
    """The headline metric per video / image for two runs, with the difference."""
    import pandas as pd

    (name_a, a), (name_b, b) = results.items()
    key, metric = ITEM_KEY[a.kind], a.primary_metric
    if a.items.empty or b.items.empty:
        return pd.DataFrame(columns=[key, name_a, name_b, "difference"])
    left = a.items[[key, metric]].rename(columns={metric: name_a})
    right = b.items[[key, metric]].rename(columns={metric: name_b})
    table = left.merge(right, on=key, how="outer")
    table["difference"] = table[name_b] - table[name_a]
    return table


def format_comparison(results: Mapping[str, EvalResult], *, max_items: int = 30) -> str:
    """Terminal text: overall metrics side by side, then the headline metric per item."""
    overall = compare_results(results)
    items = compare_items(results)
    signed = {"difference": lambda v: f"{v:+.4f}"}
    text = [overall.to_string(float_format=lambda v: f"{v:.4f}", formatters=signed)]
    if not items.empty:
        text.append(items.head(max_items).to_string(index=False, float_format=lambda v: f"{v:.4f}", formatters=signed))
    return "\n\n".join(text)
