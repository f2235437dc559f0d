"""Exact binary morphology on small numpy masks, with no SciPy or OpenCV.

The evaluation needs three operations: the Euclidean distance transform (for click placement and
for boundary tolerance), dilation by a disk (the DAVIS boundary match) and connected components
(the largest error region). All work on `[H, W]` boolean arrays and are exact, so results do not
depend on which optional packages happen to be installed.
"""

from __future__ import annotations

import numpy as np


def _column_distance(targets: np.ndarray) -> np.ndarray:
    """`[H, W]` distance along each column to the nearest True pixel of that column (inf if none)."""
    height = targets.shape[0]
    rows = np.arange(height, dtype=np.float64)[:, None]
    above = np.where(targets, rows, -np.inf)
    np.maximum.accumulate(above, axis=0, out=above)
    below = np.where(targets, rows, np.inf)
    below = np.minimum.accumulate(below[::-1], axis=0)[::-1]
    return np.minimum(rows - above, below - rows)


def _parabola_crossing(f: np.ndarray, rows: np.ndarray, apex: np.ndarray, q: int) -> np.ndarray:
    """Where the parabola rooted at column q meets the one rooted at `apex`, row by row."""
    f_apex = f[rows, apex]
    return ((f[rows, q] + q * q) - (f_apex + apex * apex)) / (2.0 * (q - apex))


def _lower_envelope(f: np.ndarray) -> np.ndarray:
    """Row-wise `min_q (p - q)^2 + f[q]` (Felzenszwalb & Huttenlocher), vectorised over rows.

    `f` is `[R, N]` with entries >= 0 or inf; the result is `[R, N]` (inf for rows of all inf).
    The scan over columns is sequential by nature, so rows advance together and only the
    rows that must drop a parabola take part in each inner step.
    """
    num_rows, n = f.shape
    all_rows = np.arange(num_rows)
    apexes = np.zeros((num_rows, n), dtype=np.int64)
    bounds = np.full((num_rows, n + 1), np.inf)
    last = np.full(num_rows, -1, dtype=np.int64)
    for q in range(n):
        finite = np.isfinite(f[:, q])
        first = finite & (last < 0)
        apexes[first, 0] = q
        bounds[first, 0] = -np.inf
        last[first] = 0
        rows = all_rows[finite & ~first]
        if rows.size == 0:
            continue
        k = last[rows]
        crossing = _parabola_crossing(f, rows, apexes[rows, k], q)
        drop = crossing <= bounds[rows, k]
        while drop.any():
            k[drop] -= 1
            crossing[drop] = _parabola_crossing(f, rows[drop], apexes[rows[drop], k[drop]], q)
            drop &= crossing <= bounds[rows, k]
        k += 1
        apexes[rows, k] = q
        bounds[rows, k] = crossing
        bounds[rows, k + 1] = np.inf
        last[rows] = k
    out = np.empty_like(f)
    segment = np.zeros(num_rows, dtype=np.int64)
    for q in range(n):
        advance = bounds[all_rows, segment + 1] < q
        while advance.any():
            segment[advance] += 1
            advance = bounds[all_rows, segment + 1] < q
        apex = apexes[all_rows, segment]
        out[:, q] = (q - apex) ** 2 + f[all_rows, apex]
    return out


def _bounded_envelope(f: np.ndarray, radius: int) -> np.ndarray:
    """`min over |dx| <= radius of dx^2 + f[:, p + dx]`: exact wherever the answer is <= radius^2."""
    out = f.copy()
    for dx in range(1, radius + 1):
        np.minimum(out[:, dx:], f[:, :-dx] + dx * dx, out=out[:, dx:])
        np.minimum(out[:, :-dx], f[:, dx:] + dx * dx, out=out[:, :-dx])
    return out


def squared_distance_to(targets: np.ndarray, *, max_distance: float | None = None) -> np.ndarray:
    """`[H, W]` float64 squared Euclidean distance from every pixel to the nearest True pixel.

    Exact (integer-valued); inf everywhere when `targets` has no True pixel. With
    `max_distance`, values are exact up to `max_distance^2` and merely larger beyond it, which is
    all a dilation needs and costs O(H W max_distance) instead of a full transform.
    """
    targets = np.asarray(targets, dtype=bool)
    if targets.ndim != 2:
        raise ValueError(f"expected an [H, W] mask, got shape {targets.shape}")
    if not targets.any():
        return np.full(targets.shape, np.inf)
    column_sq = _column_distance(targets) ** 2
    if max_distance is not None and max_distance < targets.shape[1]:
        return _bounded_envelope(column_sq, int(np.floor(max_distance)))
    return _lower_envelope(column_sq)


def distance_inside(mask: np.ndarray, *, image_border_is_boundary: bool = True) -> np.ndarray:
    """`[H, W]` Euclidean distance from each mask pixel to the nearest pixel outside the mask.

    Zero outside the mask. With `image_border_is_boundary`, the image is padded with background
    so an object touching the border is measured from the border too (as interactive
    segmentation benchmarks place clicks).
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape)
    if not mask.any():
        return out
    # Only the mask's bounding box (plus a ring of outside pixels) can matter: crop for speed.
    ys, xs = np.nonzero(mask)
    top, bottom = max(ys.min() - 1, 0), min(ys.max() + 2, mask.shape[0])
    left, right = max(xs.min() - 1, 0), min(xs.max() + 2, mask.shape[1])
    crop = mask[top:bottom, left:right]
    if image_border_is_boundary:
        padded = np.pad(crop, 1, constant_values=False)
        dist = np.sqrt(squared_distance_to(~padded))[1:-1, 1:-1]
    else:
        dist = np.sqrt(squared_distance_to(~crop))
        # A mask covering the whole image has no outside pixel: every distance is inf.
        dist = np.where(np.isfinite(dist), dist, 0.0)
    out[top:bottom, left:right] = np.where(crop, dist, 0.0)
    return out


def disk_dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilation of `[H, W]` `mask` by the disk of integer offsets with `dx^2 + dy^2 <= radius^2`.

    Pixels beyond the image are not part of the mask, so nothing leaks in from the border.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    return squared_distance_to(mask, max_distance=radius) <= radius * radius


_NEIGHBOURS = {
    4: [(-1, 0), (1, 0), (0, -1), (0, 1)],
    8: [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)],
}


def _shifted(values: np.ndarray, dy: int, dx: int, fill: int) -> np.ndarray:
    """values[y + dy, x + dx] at (y, x), `fill` where that falls outside."""
    height, width = values.shape
    out = np.full_like(values, fill)
    out[max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)] = values[
        max(0, dy) : height - max(0, -dy), max(0, dx) : width - max(0, -dx)
    ]
    return out


def label_components(mask: np.ndarray, *, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of `[H, W]` `mask`: (labels `[H, W]` int64, count).

    Background is 0; components are numbered 1..count in raster order of their first pixel.
    Every pixel repeatedly takes the smallest pixel index among its neighbours, with pointer
    jumping so long components converge in few sweeps.
    """
    if connectivity not in _NEIGHBOURS:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    none = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:
        updated = labels.copy()
        for dy, dx in _NEIGHBOURS[connectivity]:
            np.minimum(updated, _shifted(labels, dy, dx, none), out=updated)
        updated[~mask] = none
        flat = updated.reshape(-1)
        inside = flat < none
        # A label is the index of a pixel of the same component whose own label is no larger.
        flat[inside] = flat[flat[inside]]
        if np.array_equal(updated, labels):
            break
        labels = updated
    roots = np.unique(labels[mask])
    out = np.zeros(mask.shape, dtype=np.int64)
    out[mask] = np.searchsorted(roots, labels[mask]) + 1
    return out, int(roots.size)
