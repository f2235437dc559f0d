"""A small synthetic video dataset in the DAVIS/MOSE layout, for benchmarks.

    img_folder/<video>/<frame:05d>.jpg     RGB frames
    gt_folder/<video>/<frame:05d>.png      palettised PNG, pixel value = object id (0 = background)

Each video holds `num_objects` ellipses that drift across textured frames, so every object is
visible on every frame (the samplers pick objects from the first frame). The content only has to
be plausible enough that both trainers do the same work on it; it is deterministic in `seed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

# Object k gets a distinct colour; the rest of the 256 entries stay black.
_PALETTE = [0, 0, 0, 220, 20, 60, 30, 144, 255, 50, 205, 50, 255, 215, 0, 148, 0, 211] + [0] * (3 * 250)


class VideoDataset(NamedTuple):
    img_folder: Path
    gt_folder: Path
    video_names: list[str]


def _object_ids(num_objects: int, height: int, width: int, frame: int, rng: np.random.Generator) -> np.ndarray:
    """[H, W] uint8 map of `num_objects` ellipses, object k placed in its own vertical band."""
    yy, xx = np.mgrid[0:height, 0:width]
    ids = np.zeros((height, width), dtype=np.uint8)
    band = width / num_objects
    for k in range(num_objects):
        centre_x = band * (k + 0.5) + 0.1 * band * np.sin(0.4 * frame + k)
        centre_y = height * (0.5 + 0.2 * np.cos(0.3 * frame + 2 * k))
        radius_x, radius_y = 0.3 * band, 0.2 * height * (1 + 0.1 * rng.random())
        inside = ((xx - centre_x) / radius_x) ** 2 + ((yy - centre_y) / radius_y) ** 2 <= 1
        ids[inside] = k + 1
    return ids


def _frame_pixels(ids: np.ndarray, frame: int, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] uint8: a moving gradient, objects tinted by id, plus noise (so JPEG has detail)."""
    height, width = ids.shape
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx + 3 * frame) % 256, (yy + 5 * frame) % 256, (xx + yy) % 256], axis=-1).astype(np.int32)
    base += (ids[..., None].astype(np.int32) * np.array([70, 40, 110])) % 256
    base += rng.integers(0, 40, size=base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def make_video_dataset(
    root: str | Path,
    *,
    num_videos: int,
    num_frames: int,
    num_objects: int = 3,
    size: tuple[int, int] = (270, 480),
    seed: int = 0,
) -> VideoDataset:
    """Writes `num_videos` videos of `num_frames` frames of `size` (height, width) under `root`."""
    if num_objects < 1 or num_objects > 5:
        raise ValueError(f"num_objects is {num_objects}; the palette has colours for 1 to 5 objects")
    root = Path(root)
    img_folder, gt_folder = root / "JPEGImages", root / "Annotations"
    names = [f"video{v:04d}" for v in range(num_videos)]
    rng = np.random.default_rng(seed)
    for name in names:
        (img_folder / name).mkdir(parents=True, exist_ok=True)
        (gt_folder / name).mkdir(parents=True, exist_ok=True)
        for frame in range(num_frames):
            ids = _object_ids(num_objects, *size, frame, rng)
            Image.fromarray(_frame_pixels(ids, frame, rng)).save(img_folder / name / f"{frame:05d}.jpg", quality=90)
            mask = Image.fromarray(ids, mode="P")
            mask.putpalette(_PALETTE)
            mask.save(gt_folder / name / f"{frame:05d}.png")
    return VideoDataset(img_folder, gt_folder, names)
