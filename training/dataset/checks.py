"""Dataset checks: find every problem in a dataset before GPU hours are spent on it.

`check_dataset` walks a video (DAVIS/MOSE) or image (images/ + masks/) dataset and returns a
`DatasetReport`: counts, and each problem with its file. `fast=True` checks structure, pairing
and the first frame/mask of each video (what train.py runs before training); the full check
decodes every file. `check_config_datasets` runs the fast check on every dataset a training
config names. The CLI is `python -m training.tools.check_dataset`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from training.dataset.decoding import (
    IMAGE_EXTENSIONS,
    DatasetError,
    image_size,
    read_id_map,
    read_image,
)
from training.dataset.image_folder_dataset import MASK_EXTENSIONS, stems_by_name
from training.dataset.video_types import read_name_list

ERROR, WARNING = "error", "warning"


@dataclass
class Problem:
    severity: str  # ERROR: the data cannot train as is; WARNING: it can, but probably not as meant
    kind: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.path}: {self.message}"


@dataclass
class DatasetReport:
    img_folder: str
    gt_folder: str
    layout: str = "unknown"
    num_videos: int = 0
    num_frames: int = 0
    num_masks: int = 0
    num_empty_masks: int = 0
    objects_per_frame: Counter = field(default_factory=Counter)
    frame_sizes: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)

    def add(self, severity: str, kind: str, path: str, message: str) -> None:
        self.problems.append(Problem(severity, kind, path, message))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self, max_problems: int = 50) -> str:
        unit = "videos" if self.layout == "video" else "images"
        sizes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in self.frame_sizes.most_common(5)) or "-"
        objects = ", ".join(f"{k}: {n}" for k, n in sorted(self.objects_per_frame.items())) or "-"
        lines = [
            f"dataset {self.img_folder} + {self.gt_folder} ({self.layout} layout)",
            (
                f"  {unit}: {self.num_videos}, frames: {self.num_frames}, masks read: {self.num_masks}, "
                f"empty masks: {self.num_empty_masks}"
            ),
            f"  frame sizes (HxW): {sizes}",
            f"  objects per mask: {objects}",
            f"  problems: {len(self.errors)} errors, {len(self.problems) - len(self.errors)} warnings",
        ]
        lines += [f"  {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)


class DatasetCheckFailed(DatasetError):
    """Raised by `check_config_datasets` when a dataset cannot train; the message is the report."""


def detect_layout(img_folder: str) -> str:
    """"video" when img_folder holds sub-folders of frames, "images" when it holds image files."""
    entries = os.listdir(img_folder)
    if any(os.path.isdir(os.path.join(img_folder, e)) for e in entries):
        return "video"
    if any(e.lower().endswith(IMAGE_EXTENSIONS) for e in entries):
        return "images"
    return "empty"


def check_dataset(
    img_folder: str,
    gt_folder: str,
    *,
    layout: str = "auto",
    file_list_txt: str | None = None,
    is_palette: bool = True,
    fast: bool = False,
) -> DatasetReport:
    """Check one dataset; layout is "video", "images" or "auto" (detected from img_folder)."""
    report = DatasetReport(img_folder, gt_folder)
    for folder, role in ((img_folder, "img_folder"), (gt_folder, "gt_folder")):
        if folder is None or not os.path.isdir(folder):
            report.add(ERROR, "missing folder", str(folder), f"{role} does not exist")
    if not report.ok:
        return report
    report.layout = detect_layout(img_folder) if layout == "auto" else layout
    if report.layout == "empty":
        report.add(ERROR, "empty dataset", img_folder, "no video folders and no images")
        return report
    try:
        names = read_name_list(file_list_txt) if file_list_txt else None
    except DatasetError as exc:
        report.add(ERROR, "missing file list", str(file_list_txt), str(exc))
        return report
    if report.layout == "video":
        _check_videos(report, names, is_palette, fast)
    else:
        _check_images(report, names, fast)
    return report


def _mask_ids(report: DatasetReport, path: str, expected_size: tuple[int, int] | None) -> np.ndarray | None:
    """Decode one mask and record its statistics and problems; None when unusable."""
    try:
        ids = read_id_map(path)
    except DatasetError as exc:
        kind = "colour RGB mask" if "colour RGB" in str(exc) else "unreadable mask"
        report.add(ERROR, kind, path, str(exc))
        return None
    report.num_masks += 1
    num_objects = len(np.unique(ids[ids != 0]))
    report.objects_per_frame[num_objects] += 1
    if num_objects == 0:
        report.num_empty_masks += 1
    if expected_size is not None and ids.shape != expected_size:
        report.add(ERROR, "size mismatch", path, f"mask is {ids.shape[0]}x{ids.shape[1]} but its frame is "
                   f"{expected_size[0]}x{expected_size[1]}")
    return ids


def _frame_size(report: DatasetReport, path: str, decode: bool) -> tuple[int, int] | None:
    try:
        size = tuple(read_image(path).shape[-2:]) if decode else image_size(path)
    except DatasetError as exc:
        report.add(ERROR, "corrupt frame", path, str(exc))
        return None
    report.frame_sizes[size] += 1
    return size


def _numbered(names: list[str]) -> dict[int, str]:
    out = {}
    for name in names:
        try:
            out[int(name.split(".")[0])] = name
        except ValueError:
            pass
    return out


def _check_videos(report: DatasetReport, names: list[str] | None, is_palette: bool, fast: bool) -> None:
    img_folder = report.img_folder
    present = sorted(n for n in os.listdir(img_folder) if os.path.isdir(os.path.join(img_folder, n)))
    if names is not None:
        for missing in sorted(set(names) - set(present)):
            report.add(ERROR, "listed video missing", os.path.join(img_folder, missing), "named in file_list_txt")
        present = [n for n in names if n in set(present)]
    report.num_videos = len(present)
    for video in present:
        _check_video(report, video, is_palette, fast)


def _check_video(report: DatasetReport, video: str, is_palette: bool, fast: bool) -> None:
    frame_dir, mask_dir = os.path.join(report.img_folder, video), os.path.join(report.gt_folder, video)
    files = sorted(os.listdir(frame_dir))
    frames = [f for f in files if f.lower().endswith((".jpg", ".jpeg", ".png"))]
    report.num_frames += len(frames)
    if not frames:
        report.add(ERROR, "video without frames", frame_dir, "no .jpg/.jpeg/.png frames")
        return
    non_jpeg = [f for f in frames if not f.lower().endswith((".jpg", ".jpeg"))]
    if non_jpeg:
        report.add(WARNING, "non-JPEG frames", os.path.join(frame_dir, non_jpeg[0]),
                   f"{len(non_jpeg)} frames are not JPEG; the official PNGRawDataset reads only .jpg")
    numbered = _numbered(frames)
    for bad in sorted(set(frames) - set(numbered.values()))[:5]:
        report.add(ERROR, "frame not numbered", os.path.join(frame_dir, bad), "name frames 00000.jpg, 00001.jpg, ...")
    if not os.path.isdir(mask_dir):
        report.add(ERROR, "video without masks", mask_dir, "no mask folder for this video")
        return
    subdirs = [d for d in os.listdir(mask_dir) if os.path.isdir(os.path.join(mask_dir, d))]
    pngs = [f for f in os.listdir(mask_dir) if f.lower().endswith(".png")]
    if is_palette and subdirs and not pngs:
        report.add(ERROR, "layout confusion", mask_dir, "per-object sub-folders found; set is_palette=False")
        return
    if not is_palette:
        if not subdirs:
            report.add(ERROR, "layout confusion", mask_dir, "no per-object sub-folders; set is_palette=True")
            return
        pngs = sorted({p for d in subdirs for p in os.listdir(os.path.join(mask_dir, d)) if p.endswith(".png")})
    masks = _numbered(pngs)
    annotated = sorted(set(numbered) & set(masks))
    if not annotated:
        report.add(ERROR, "no annotated frames", mask_dir, f"none of the {len(frames)} frames has a mask")
        return
    for fid in sorted(set(masks) - set(numbered))[:5]:
        report.add(WARNING, "mask without frame", os.path.join(mask_dir, masks[fid]), "no frame with this number")
    unannotated = sorted(set(numbered) - set(masks))
    if unannotated and is_palette:
        report.add(WARNING, "frames without mask", os.path.join(frame_dir, numbered[unannotated[0]]),
                   f"{len(unannotated)} frames have no mask and are left out of training")
    checked = annotated[:1] if fast else annotated
    any_object = False
    for fid in checked:
        size = _frame_size(report, os.path.join(frame_dir, numbered[fid]), decode=not fast)
        mask_paths = [os.path.join(mask_dir, masks[fid])] if is_palette else [
            os.path.join(mask_dir, d, masks[fid]) for d in subdirs if os.path.exists(os.path.join(mask_dir, d, masks[fid]))
        ]
        for path in mask_paths:
            ids = _mask_ids(report, path, size)
            any_object = any_object or (ids is not None and bool((ids != 0).any()))
    if not fast and not any_object:
        report.add(ERROR, "no objects", mask_dir, "every mask of this video is empty")


def _check_images(report: DatasetReport, names: list[str] | None, fast: bool) -> None:
    try:
        images = stems_by_name(report.img_folder, IMAGE_EXTENSIONS)
        masks = stems_by_name(report.gt_folder, MASK_EXTENSIONS)
    except DatasetError as exc:
        report.add(ERROR, "duplicate names", report.img_folder, str(exc))
        return
    stems = sorted(images) if names is None else names
    report.num_videos = report.num_frames = len(stems)
    for stem in stems:
        if stem not in images:
            report.add(ERROR, "listed image missing", os.path.join(report.img_folder, stem), "named in file_list_txt")
        elif stem not in masks:
            report.add(ERROR, "image without mask", os.path.join(report.img_folder, images[stem]),
                       f"expected {os.path.join(report.gt_folder, stem + '.png')}")
    for stem in sorted(set(masks) - set(images)):
        report.add(WARNING, "mask without image", os.path.join(report.gt_folder, masks[stem]), "no image with this stem")
    for stem in [s for s in stems if s in images and s in masks]:
        size = _frame_size(report, os.path.join(report.img_folder, images[stem]), decode=not fast)
        ids = _mask_ids(report, os.path.join(report.gt_folder, masks[stem]), size)
        if ids is not None and not (ids != 0).any():
            report.add(WARNING, "empty mask", os.path.join(report.gt_folder, masks[stem]), "no object; never sampled")


_CHECKED_TARGETS = ("PNGRawDataset", "ImageFolderRawDataset")


def dataset_nodes(node) -> Iterator[Mapping]:
    if isinstance(node, Mapping):
        if str(node.get("_target_", "")).rsplit(".", 1)[-1] in _CHECKED_TARGETS:
            yield node
        for value in node.values():
            yield from dataset_nodes(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from dataset_nodes(value)


def config_reports(data_config, fast: bool = True) -> list[DatasetReport]:
    """Reports for every PNGRawDataset / ImageFolderRawDataset of a resolved config container."""
    return [
        check_dataset(
            node.get("img_folder"), node.get("gt_folder"),
            layout="images" if node["_target_"].endswith("ImageFolderRawDataset") else "video",
            file_list_txt=node.get("file_list_txt"), is_palette=node.get("is_palette", True), fast=fast,
        )
        for node in dataset_nodes(data_config)
    ]


def check_config_datasets(data_config, fast: bool = True) -> list[DatasetReport]:
    """Check every dataset a training config names; raise DatasetCheckFailed if one cannot train.

    `data_config` is a plain container, e.g. OmegaConf.to_container(cfg.trainer.data, resolve=True).
    train.py calls this before building the model.
    """
    reports = config_reports(data_config, fast)
    failed = [r for r in reports if not r.ok]
    if failed:
        raise DatasetCheckFailed(
            "the training data cannot be used:\n" + "\n".join(r.summary() for r in failed)
            + "\nrun python -m training.tools.check_dataset for the full check"
        )
    return reports
