"""Segment loaders: given a frame id, return that frame's object masks.

Every loader answers `load(frame_id) -> {object_id: [H, W] bool tensor}` (the JSON loader also
takes `obj_ids`). Ids come in a fixed order (first appearance in raster order for id maps,
sorted folder names for per-object PNGs) because the sampler draws objects from that order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from training.dataset.decoding import (
    DatasetError,
    decode_rle,
    image_size,
    object_ids_in_order,
    read_id_map,
)


def _frame_id(filename: str, folder: str) -> int:
    stem = os.path.splitext(filename)[0]
    try:
        return int(stem)
    except ValueError:
        raise DatasetError(
            f"mask {os.path.join(folder, filename)} is not named by its frame number; "
            "name masks like the frames they annotate (00000.png, 00001.png, ...)"
        ) from None


def _png_index(folder: str) -> dict[int, str]:
    """frame id -> PNG file name for the masks in `folder`."""
    if not os.path.isdir(folder):
        raise DatasetError(f"mask folder {folder} does not exist; check gt_folder and the video name")
    names = [n for n in os.listdir(folder) if n.lower().endswith(".png")]
    return {_frame_id(n, folder): n for n in names}


def split_id_map(id_map: np.ndarray | Tensor) -> dict[int, Tensor]:
    """[H, W] id map -> {id: [H, W] bool mask} for each non-zero id, in first-appearance order."""
    array = id_map.numpy() if isinstance(id_map, Tensor) else id_map
    ids = object_ids_in_order(array)
    if len(ids) == 0:
        return {}
    # Compare in the map's own integer type (uint8 for palettes) rather than widening it.
    dtype = np.uint8 if array.dtype == np.uint8 else np.int32
    masks = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))[None] == torch.from_numpy(ids.astype(dtype))[:, None, None]
    return {int(i): m for i, m in zip(ids.tolist(), masks)}


class PalettisedPNGSegmentLoader:
    """One id-map PNG per frame (`<video_png_root>/<frame>.png`); each non-zero id is an object."""

    def __init__(self, video_png_root: str) -> None:
        self.video_png_root = video_png_root
        self.frame_id_to_png_filename = _png_index(video_png_root)
        # The sampler reads the clip's first frame and the dataset reads it again: decode once.
        self._last: tuple[int, dict[int, Tensor]] | None = None

    def annotated_frame_ids(self) -> set[int]:
        return set(self.frame_id_to_png_filename)

    def mask_path(self, frame_id: int) -> str:
        name = self.frame_id_to_png_filename.get(frame_id)
        if name is None:
            raise DatasetError(f"frame {frame_id} has no mask PNG in {self.video_png_root}")
        return os.path.join(self.video_png_root, name)

    def load(self, frame_id: int) -> dict[int, Tensor]:
        if self._last is None or self._last[0] != frame_id:
            self._last = (frame_id, split_id_map(read_id_map(self.mask_path(frame_id))))
        return dict(self._last[1])

    def __len__(self) -> int:
        return len(self.frame_id_to_png_filename)


class MultiplePNGSegmentLoader:
    """Binary PNGs per object: `<video_png_root>/<object>/<frame>.png`; object folder k is id k + 1.

    With `single_object_mode`, `video_png_root` is one object's folder. A frame without a PNG
    for an object gets an empty mask.
    """

    def __init__(self, video_png_root: str, single_object_mode: bool = False) -> None:
        self.video_png_root = video_png_root
        self.single_object_mode = single_object_mode
        if single_object_mode:
            folders = [video_png_root]
        else:
            if not os.path.isdir(video_png_root):
                raise DatasetError(f"mask folder {video_png_root} does not exist; check gt_folder")
            folders = sorted(
                os.path.join(video_png_root, n) for n in os.listdir(video_png_root)
                if os.path.isdir(os.path.join(video_png_root, n))
            )
            if not folders:
                raise DatasetError(
                    f"{video_png_root} has no per-object sub-folders; with is_palette=False masks must be "
                    "<gt_folder>/<video>/<object>/<frame>.png (use is_palette=True for one id-map PNG per frame)"
                )
        self._objects: list[tuple[int, str, dict[int, str]]] = []
        for folder in folders:
            name = os.path.basename(os.path.normpath(folder))
            try:
                object_id = int(name) + 1  # 0 is background
            except ValueError:
                raise DatasetError(f"object folder {folder} must be named by an integer object index") from None
            self._objects.append((object_id, folder, _png_index(folder)))
        any_index = next((idx for _, _, idx in self._objects if idx), None)
        if any_index is None:
            raise DatasetError(f"no mask PNGs under {video_png_root}")
        folder = next(f for _, f, idx in self._objects if idx)
        self.H, self.W = image_size(os.path.join(folder, next(iter(any_index.values()))))
        self.obj_id = self._objects[0][0] if single_object_mode else None

    def annotated_frame_ids(self) -> set[int]:
        return set().union(*(set(index) for _, _, index in self._objects))

    def load(self, frame_id: int) -> dict[int, Tensor]:
        segments = {}
        for object_id, folder, index in self._objects:
            name = index.get(frame_id)
            if name is None:
                segments[object_id] = torch.zeros(self.H, self.W, dtype=torch.bool)
            else:
                segments[object_id] = torch.from_numpy(read_id_map(os.path.join(folder, name)) > 0)
        return segments

    def __len__(self) -> int:
        return len(self.annotated_frame_ids())


class JSONSegmentLoader:
    """SA-V style masklets: a JSON list (or {"masklet"|"masks": list}) of per-frame lists of RLEs.

    Entry k of the list annotates frame k * ann_every; entry j within it is object j (None when
    that object has no mask there). With an "fps" field, ann_every = frames_fps // fps.
    """

    def __init__(
        self, video_json_path: str, ann_every: int = 1, frames_fps: int = 24, valid_obj_ids: list[int] | None = None
    ) -> None:
        self.ann_every = ann_every
        self.valid_obj_ids = valid_obj_ids
        try:
            with open(video_json_path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"cannot read masklet JSON {video_json_path}: {exc}") from exc
        if isinstance(data, list):
            self.frame_annots = data
        elif isinstance(data, dict):
            self.frame_annots = data["masklet" if "masklet" in data else "masks"]
            if "fps" in data:
                fps = data["fps"]
                fps = int(fps[0] if isinstance(fps, list) else fps)
                if frames_fps % fps != 0:
                    raise DatasetError(
                        f"{video_json_path}: annotation fps {fps} does not divide frames_fps {frames_fps}"
                    )
                self.ann_every = frames_fps // fps
        else:
            raise DatasetError(f"{video_json_path}: expected a list or a dict of masklets, got {type(data).__name__}")

    def load(self, frame_id: int, obj_ids: list[int] | None = None) -> dict[int, Tensor | None]:
        if frame_id % self.ann_every != 0:
            raise DatasetError(f"frame {frame_id} is not annotated (annotations every {self.ann_every} frames)")
        rles = self.frame_annots[frame_id // self.ann_every]
        wanted = set(range(len(rles)))
        if self.valid_obj_ids is not None:
            wanted &= set(self.valid_obj_ids)
        if obj_ids is not None:
            wanted &= set(obj_ids)
        return {
            obj_id: None if rles[obj_id] is None else torch.from_numpy(decode_rle(rles[obj_id]))
            for obj_id in sorted(wanted)
        }

    def get_valid_obj_frames_ids(self, num_frames_min: int | None = None) -> dict[int, list[int]]:
        """object id -> frames where it has a mask; objects with fewer than num_frames_min dropped."""
        num_objects = len(self.frame_annots[0])
        valid = {
            obj_id: [k * self.ann_every for k, annot in enumerate(self.frame_annots) if annot[obj_id] is not None]
            for obj_id in range(num_objects)
        }
        if num_frames_min is not None:
            valid = {k: v for k, v in valid.items() if len(v) >= num_frames_min}
        return valid


class LazySegments:
    """A dict-like view of RLE segments that decodes each mask on first access."""

    def __init__(self) -> None:
        self.segments: dict[int, dict] = {}
        self.cache: dict[int, Tensor] = {}

    def __setitem__(self, key: int, rle: dict) -> None:
        self.segments[key] = rle

    def __getitem__(self, key: int) -> Tensor:
        if key not in self.cache:
            self.cache[key] = torch.from_numpy(decode_rle(self.segments[key]))
        return self.cache[key]

    def __contains__(self, key: object) -> bool:
        return key in self.segments

    def get(self, key: int, default: Tensor | None = None) -> Tensor | None:
        return self[key] if key in self.segments else default

    def __len__(self) -> int:
        return len(self.segments)

    def __iter__(self) -> Iterator[int]:
        return iter(self.segments)

    def keys(self):
        return self.segments.keys()


class SA1BSegmentLoader:
    """SA-1B annotations (one JSON per image, COCO RLE per mask) with quality filters.

    Masks with zero area, with `uncertain_iou` (stability score) below the threshold, or
    covering at least `mask_area_frac_thresh` of the image are dropped. Ids are 0..N-1.
    """

    def __init__(
        self,
        video_mask_path: str,
        mask_area_frac_thresh: float = 1.1,
        video_frame_path: str | None = None,
        uncertain_iou: float = -1,
    ) -> None:
        try:
            with open(video_mask_path) as f:
                annotations = json.load(f)["annotations"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise DatasetError(f"cannot read SA-1B annotations {video_mask_path}: {exc!r}") from exc
        image_area = None
        if mask_area_frac_thresh <= 1.0:
            if video_frame_path is None:
                raise ValueError("mask_area_frac_thresh <= 1 needs video_frame_path to know the image area")
            height, width = image_size(video_frame_path)
            image_area = height * width
        self.segments = LazySegments()
        for annot in annotations:
            if not annot["area"] > 0:
                continue
            if "uncertain_iou" in annot and annot["uncertain_iou"] < uncertain_iou:
                continue
            if image_area is not None and annot["area"] / image_area >= mask_area_frac_thresh:
                continue
            self.segments[len(self.segments)] = annot["segmentation"]

    def load(self, frame_idx: int) -> LazySegments:
        return self.segments
