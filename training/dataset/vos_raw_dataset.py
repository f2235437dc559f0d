"""Raw video datasets: which videos exist, which frames they have, where their masks are.

`PNGRawDataset` reads the DAVIS/MOSE layout; `SA1BRawDataset` and `JSONRawDataset` (SA-V) live in
`sa_raw_datasets.py` and `ImageFolderRawDataset` (images/ + masks/ side by side) in
`image_folder_dataset.py`; all are importable from here, the path configs name.
"""

from __future__ import annotations

import logging
import os

from training.dataset.decoding import DatasetError, list_files
from training.dataset.image_folder_dataset import ImageFolderRawDataset
from training.dataset.sa_raw_datasets import JSONRawDataset, SA1BRawDataset
from training.dataset.video_types import (
    VOSFrame,
    VOSRawDataset,
    VOSVideo,
    read_name_list,
)
from training.dataset.vos_segment_loader import (
    MultiplePNGSegmentLoader,
    PalettisedPNGSegmentLoader,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ImageFolderRawDataset",
    "JSONRawDataset",
    "PNGRawDataset",
    "SA1BRawDataset",
    "VOSFrame",
    "VOSRawDataset",
    "VOSVideo",
]

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


def existing_folder(path: str | None, role: str) -> str:
    if path is None or not os.path.isdir(path):
        raise DatasetError(f"{role} {path!r} is not a folder; set dataset.{role} to the folder holding your data")
    return path


def select_videos(img_folder: str, file_list_txt: str | None, excluded_videos_list_txt) -> list[str]:
    """Sorted video names: those of file_list_txt (all must exist) or every sub-folder, minus exclusions."""
    if file_list_txt is not None:
        names = read_name_list(file_list_txt)
        missing = [n for n in names if not os.path.isdir(os.path.join(img_folder, n))]
        if missing:
            raise DatasetError(
                f"{len(missing)} of the {len(names)} videos named in {file_list_txt} are not folders of "
                f"{img_folder}: {missing[:5]}{' ...' if len(missing) > 5 else ''}; fix the list or the folder"
            )
    else:
        names = [n for n in os.listdir(img_folder) if os.path.isdir(os.path.join(img_folder, n))]
    excluded = set(read_name_list(excluded_videos_list_txt))
    names = sorted(n for n in names if n not in excluded)
    if not names:
        raise DatasetError(
            f"no videos found in {img_folder} (file_list_txt={file_list_txt}); expected one folder of "
            "frames per video: <img_folder>/<video>/00000.jpg"
        )
    return names


class PNGRawDataset(VOSRawDataset):
    """Videos as folders of frames with PNG masks: the DAVIS / MOSE / YouTube-VOS layout.

    img_folder/<video>/<frame>.jpg (or .jpeg/.png), frames named by their number.
    gt_folder/<video>/<frame>.png: one id map per frame when `is_palette` (palettised or
    grayscale, 16-bit for ids above 255), else gt_folder/<video>/<object>/<frame>.png binary.
    Frames without a mask PNG are left out of the video (palette layout).

    single_object_mode: each (video, object) pair is an item of its own (per-object layout).
    sample_rate: keep every n-th frame. truncate_video: keep the first n frames (-1: all).
    frames_sampling_mult: list each video once per frame, so long videos are drawn more often.
    """

    def __init__(
        self,
        img_folder: str,
        gt_folder: str,
        file_list_txt: str | None = None,
        excluded_videos_list_txt: str | None = None,
        sample_rate: int = 1,
        is_palette: bool = True,
        single_object_mode: bool = False,
        truncate_video: int = -1,
        frames_sampling_mult: bool = False,
    ) -> None:
        self.img_folder = existing_folder(img_folder, "img_folder")
        self.gt_folder = existing_folder(gt_folder, "gt_folder")
        self.sample_rate = sample_rate
        self.is_palette = is_palette
        self.single_object_mode = single_object_mode
        self.truncate_video = truncate_video
        self.video_names = select_videos(img_folder, file_list_txt, excluded_videos_list_txt)

        if single_object_mode:
            self.video_names = sorted(
                os.path.join(name, obj)
                for name in self.video_names
                for obj in os.listdir(existing_folder(os.path.join(gt_folder, name), "gt_folder"))
            )
        if frames_sampling_mult:
            self.video_names = [
                name
                for name in self.video_names
                for _ in range(len(os.listdir(self.frame_root(name))))
            ]

    def frame_root(self, video_name: str) -> str:
        if self.single_object_mode:
            video_name = os.path.dirname(video_name)
        return os.path.join(self.img_folder, video_name)

    def get_video(self, idx: int) -> tuple[VOSVideo, PalettisedPNGSegmentLoader | MultiplePNGSegmentLoader]:
        video_name = self.video_names[idx]
        mask_root = os.path.join(self.gt_folder, video_name)
        if self.is_palette:
            segment_loader = PalettisedPNGSegmentLoader(mask_root)
        else:
            segment_loader = MultiplePNGSegmentLoader(mask_root, self.single_object_mode)

        frame_root = self.frame_root(video_name)
        names = list_files(frame_root, FRAME_EXTENSIONS)
        if self.truncate_video > 0:
            names = names[: self.truncate_video]
        frames = [VOSFrame(frame_number(name, frame_root), os.path.join(frame_root, name)) for name in names]
        frames = frames[:: self.sample_rate]
        annotated = segment_loader.annotated_frame_ids()
        if self.is_palette:
            kept = [f for f in frames if f.frame_idx in annotated]
            if 0 < len(kept) < len(frames):
                logger.debug("video %s: %d frames without a mask left out", video_name, len(frames) - len(kept))
            frames = kept
        if not frames or not annotated:
            raise DatasetError(
                f"video {video_name} has no annotated frames ({len(names)} frames in {frame_root}, "
                f"{len(annotated)} masks in {mask_root}); add masks named like the frames, or exclude the video"
            )
        return VOSVideo(video_name, idx, frames), segment_loader

    def __len__(self) -> int:
        return len(self.video_names)


def frame_number(filename: str, folder: str) -> int:
    stem = filename.split(".")[0]
    try:
        return int(stem)
    except ValueError:
        raise DatasetError(
            f"frame {os.path.join(folder, filename)} is not named by its number; rename frames "
            "00000.jpg, 00001.jpg, ... (masks likewise)"
        ) from None
