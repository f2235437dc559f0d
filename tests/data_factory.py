"""Tiny synthetic datasets on disk, in every layout the training pipeline reads.

Objects are axis-aligned rectangles that move one pixel step per frame, each in its own
horizontal band so they never overlap; `object_box` gives the exact box of any object on any
frame, so tests can check loaded masks pixel for pixel.

    paths = make_video_dataset(tmp_path, num_videos=2, num_frames=5, size=(32, 48), num_objects=2)
    PNGRawDataset(paths.img_folder, paths.gt_folder)

    paths = make_image_dataset(tmp_path, num_images=3, size=(32, 48), num_objects=2)
    ImageFolderRawDataset(paths.img_folder, paths.gt_folder)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from training.dataset.decoding import encode_rle

# DAVIS-style palette: index k gets a distinct colour.
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128] + [7 * i % 256 for i in range(750)]


class DatasetPaths(NamedTuple):
    img_folder: str
    gt_folder: str
    names: list[str]


def object_box(video: int, obj: int, frame: int, size: tuple[int, int], num_objects: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), exclusive ends, of object `obj` (0-based) on `frame` of `video`."""
    height, width = size
    band = height // num_objects
    box_h, box_w = max(2, band // 2), max(3, width // 5)
    top = obj * band + (band - box_h) // 2
    left = (3 * video + 2 * obj + frame) % (width - box_w)
    return top, left, top + box_h, left + box_w


def id_map(video: int, frame: int, size: tuple[int, int], num_objects: int, ids: list[int]) -> np.ndarray:
    """[H, W] int64 map with ids[k] inside object k's box and 0 elsewhere."""
    out = np.zeros(size, dtype=np.int64)
    for obj, obj_id in enumerate(ids):
        top, left, bottom, right = object_box(video, obj, frame, size, num_objects)
        out[top:bottom, left:right] = obj_id
    return out


def frame_image(video: int, frame: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """[H, W, 3] uint8 test frame: a smooth gradient (compresses well as JPEG) plus noise."""
    rng = np.random.default_rng(seed * 100003 + video * 1009 + frame)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), (xx + yy + 40 * frame) % 256], -1)
    noise = rng.integers(0, 30, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save_palette_png(ids: np.ndarray, path: str | Path) -> None:
    img = Image.fromarray(ids.astype(np.uint8), mode="P")
    img.putpalette(PALETTE)
    img.save(path)


def save_mask(ids: np.ndarray, path: str | Path, mask_format: str) -> None:
    """Write an id map as "palette", "L" (8-bit gray), "I;16" (16-bit gray) or "binary" (0/255)."""
    if mask_format == "palette":
        save_palette_png(ids, path)
    elif mask_format == "L":
        Image.fromarray(ids.astype(np.uint8), mode="L").save(path)
    elif mask_format == "I;16":
        Image.fromarray(ids.astype(np.uint16)).save(path)
    elif mask_format == "binary":
        Image.fromarray(((ids > 0) * 255).astype(np.uint8), mode="L").save(path)
    elif mask_format == "rgb":
        Image.fromarray(np.asarray(PALETTE[:768], dtype=np.uint8).reshape(256, 3)[ids.astype(np.uint8)]).save(path)
    else:
        raise ValueError(f"unknown mask_format {mask_format!r}")


def make_video_dataset(
    root: str | Path,
    num_videos: int = 2,
    num_frames: int = 5,
    size: tuple[int, int] = (32, 48),
    num_objects: int = 2,
    layout: str = "palette",
    *,
    image_ext: str = ".jpg",
    object_ids: list[int] | None = None,
    mask_format: str = "palette",
    seed: int = 0,
) -> DatasetPaths:
    """DAVIS/MOSE layout under root: JPEGImages/<video>/<frame:05d>.jpg and Annotations/<video>/...

    layout "palette": Annotations/<video>/<frame>.png id maps (ids `object_ids`, default 1..N,
    written as `mask_format`); "per_object": Annotations/<video>/<k>/<frame>.png binary masks,
    which the loader numbers k + 1.
    """
    if layout not in ("palette", "per_object"):
        raise ValueError(f"layout must be 'palette' or 'per_object', got {layout!r}")
    ids = object_ids or list(range(1, num_objects + 1))
    img_folder, gt_folder = Path(root) / "JPEGImages", Path(root) / "Annotations"
    names = [f"video{v:03d}" for v in range(num_videos)]
    for v, name in enumerate(names):
        os.makedirs(img_folder / name, exist_ok=True)
        os.makedirs(gt_folder / name, exist_ok=True)
        for t in range(num_frames):
            Image.fromarray(frame_image(v, t, size, seed)).save(img_folder / name / f"{t:05d}{image_ext}", quality=95)
            ids_t = id_map(v, t, size, num_objects, ids)
            if layout == "palette":
                save_mask(ids_t, gt_folder / name / f"{t:05d}.png", mask_format)
            else:
                for k, obj_id in enumerate(ids):
                    os.makedirs(gt_folder / name / str(k), exist_ok=True)
                    save_mask((ids_t == obj_id).astype(np.int64), gt_folder / name / str(k) / f"{t:05d}.png", "binary")
    return DatasetPaths(str(img_folder), str(gt_folder), names)


def make_image_dataset(
    root: str | Path,
    num_images: int = 3,
    size: tuple[int, int] = (32, 48),
    num_objects: int = 2,
    *,
    mask_format: str = "palette",
    image_ext: str = ".jpg",
    seed: int = 0,
) -> DatasetPaths:
    """images/<name><image_ext> with masks/<name>.png side by side (ids 1..N, or one object if binary)."""
    img_folder, gt_folder = Path(root) / "images", Path(root) / "masks"
    os.makedirs(img_folder, exist_ok=True)
    os.makedirs(gt_folder, exist_ok=True)
    names = [f"img{i:03d}" for i in range(num_images)]
    for i, name in enumerate(names):
        Image.fromarray(frame_image(i, 0, size, seed)).save(img_folder / f"{name}{image_ext}", quality=95)
        save_mask(id_map(i, 0, size, num_objects, list(range(1, num_objects + 1))), gt_folder / f"{name}.png", mask_format)
    return DatasetPaths(str(img_folder), str(gt_folder), names)


def make_sa1b_dataset(
    root: str | Path, num_images: int = 2, size: tuple[int, int] = (32, 48), num_objects: int = 3
) -> DatasetPaths:
    """SA-1B layout: images/sa_<n>.jpg and annotations/sa_<n>.json with COCO RLE masks."""
    img_folder, gt_folder = Path(root) / "images", Path(root) / "annotations"
    os.makedirs(img_folder, exist_ok=True)
    os.makedirs(gt_folder, exist_ok=True)
    names = [f"sa_{i + 1}" for i in range(num_images)]
    for i, name in enumerate(names):
        Image.fromarray(frame_image(i, 0, size)).save(img_folder / f"{name}.jpg", quality=95)
        ids = id_map(i, 0, size, num_objects, list(range(1, num_objects + 1)))
        annotations = []
        for k in range(1, num_objects + 1):
            mask = ids == k
            annotations.append({"id": k, "area": int(mask.sum()), "segmentation": encode_rle(mask)})
        with open(gt_folder / f"{name}.json", "w") as f:
            json.dump({"image": {"file_name": f"{name}.jpg"}, "annotations": annotations}, f)
    return DatasetPaths(str(img_folder), str(gt_folder), names)


def make_sav_dataset(
    root: str | Path, num_videos: int = 2, num_frames: int = 4, size: tuple[int, int] = (32, 48), num_objects: int = 2
) -> DatasetPaths:
    """SA-V layout: JPEGImages/<video>/<frame:05d>.jpg and Annotations/<video>_manual.json masklets."""
    img_folder, gt_folder = Path(root) / "JPEGImages", Path(root) / "Annotations"
    os.makedirs(gt_folder, exist_ok=True)
    names = [f"sav_{v:03d}" for v in range(num_videos)]
    for v, name in enumerate(names):
        os.makedirs(img_folder / name, exist_ok=True)
        masklet = []
        for t in range(num_frames):
            Image.fromarray(frame_image(v, t, size)).save(img_folder / name / f"{t:05d}.jpg", quality=95)
            ids = id_map(v, t, size, num_objects, list(range(1, num_objects + 1)))
            masklet.append([encode_rle(ids == k) for k in range(1, num_objects + 1)])
        with open(gt_folder / f"{name}_manual.json", "w") as f:
            json.dump({"masklet": masklet, "video_id": name}, f)
    return DatasetPaths(str(img_folder), str(gt_folder), names)
