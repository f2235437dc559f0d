"""Raw datasets for the Segment Anything data: SA-1B images and SA-V videos (COCO RLE in JSON)."""

from __future__ import annotations

import os

from training.dataset.decoding import DatasetError
from training.dataset.video_types import (
    VOSFrame,
    VOSRawDataset,
    VOSVideo,
    read_name_list,
)
from training.dataset.vos_segment_loader import JSONSegmentLoader, SA1BSegmentLoader


def _folder(path: str | None, role: str) -> str:
    if path is None or not os.path.isdir(path):
        raise DatasetError(f"{role} {path!r} is not a folder; set it to the folder holding your data")
    return path


class SA1BRawDataset(VOSRawDataset):
    """SA-1B: img_folder/sa_<n>.jpg with gt_folder/sa_<n>.json; each image a clip of `num_frames` copies.

    mask_area_frac_thresh drops masks covering at least that fraction of the image (1.1: keep
    all); uncertain_iou drops masks whose stability score is below it (-1: keep all).
    The video id is the image number n, which evaluation uses to find the annotation file.
    """

    def __init__(
        self,
        img_folder: str,
        gt_folder: str,
        file_list_txt: str | None = None,
        excluded_videos_list_txt: str | None = None,
        num_frames: int = 1,
        mask_area_frac_thresh: float = 1.1,
        uncertain_iou: float = -1,
    ) -> None:
        self.img_folder = _folder(img_folder, "img_folder")
        self.gt_folder = _folder(gt_folder, "gt_folder")
        self.num_frames = num_frames
        self.mask_area_frac_thresh = mask_area_frac_thresh
        self.uncertain_iou = uncertain_iou
        if file_list_txt is not None:
            names = read_name_list(file_list_txt)
        else:
            names = [n.split(".")[0] for n in os.listdir(img_folder) if n.endswith(".jpg")]
        excluded = set(read_name_list(excluded_videos_list_txt))
        self.video_names = [n for n in names if n not in excluded]
        if not self.video_names:
            raise DatasetError(f"no images found in {img_folder}; SA-1B layout is <img_folder>/sa_<n>.jpg")

    def get_video(self, idx: int) -> tuple[VOSVideo, SA1BSegmentLoader]:
        name = self.video_names[idx]
        frame_path = os.path.join(self.img_folder, name + ".jpg")
        segment_loader = SA1BSegmentLoader(
            os.path.join(self.gt_folder, name + ".json"),
            mask_area_frac_thresh=self.mask_area_frac_thresh,
            video_frame_path=frame_path,
            uncertain_iou=self.uncertain_iou,
        )
        frames = [VOSFrame(i, image_path=frame_path) for i in range(self.num_frames)]
        number = name.split("_")[-1]
        try:
            video_id = int(number)
        except ValueError:
            raise DatasetError(f"SA-1B image {frame_path} must be named sa_<number>.jpg") from None
        return VOSVideo(number, video_id, frames), segment_loader

    def __len__(self) -> int:
        return len(self.video_names)


class JSONRawDataset(VOSRawDataset):
    """SA-V: img_folder/<video>/<frame:05d>.jpg with gt_folder/<video>_manual.json masklets.

    rm_unannotated keeps only frames that carry a mask for every object; ann_every and
    frames_fps say how annotation entries map to frame numbers (see JSONSegmentLoader).
    """

    def __init__(
        self,
        img_folder: str,
        gt_folder: str,
        file_list_txt: str | None = None,
        excluded_videos_list_txt=None,
        sample_rate: int = 1,
        rm_unannotated: bool = True,
        ann_every: int = 1,
        frames_fps: int = 24,
    ) -> None:
        self.img_folder = _folder(img_folder, "img_folder")
        self.gt_folder = _folder(gt_folder, "gt_folder")
        self.sample_rate = sample_rate
        self.rm_unannotated = rm_unannotated
        self.ann_every = ann_every
        self.frames_fps = frames_fps
        excluded = set(read_name_list(excluded_videos_list_txt))
        names = read_name_list(file_list_txt) if file_list_txt is not None else os.listdir(img_folder)
        self.video_names = sorted(n for n in names if n not in excluded)
        if not self.video_names:
            raise DatasetError(f"no videos found in {img_folder}; SA-V layout is <img_folder>/<video>/00000.jpg")

    def get_video(self, video_idx: int) -> tuple[VOSVideo, JSONSegmentLoader]:
        name = self.video_names[video_idx]
        segment_loader = JSONSegmentLoader(
            video_json_path=os.path.join(self.gt_folder, name + "_manual.json"),
            ann_every=self.ann_every,
            frames_fps=self.frames_fps,
        )
        frame_ids = sorted(int(os.path.splitext(n)[0]) for n in os.listdir(os.path.join(self.img_folder, name)))
        frames = [
            VOSFrame(fid, image_path=os.path.join(self.img_folder, name, f"{fid:05d}.jpg"))
            for fid in frame_ids[:: self.sample_rate]
        ]
        if self.rm_unannotated:
            every = segment_loader.ann_every
            annotated = {
                k * every
                for k, annot in enumerate(segment_loader.frame_annots)
                if annot is not None and None not in annot
            }
            frames = [f for f in frames if f.frame_idx in annotated]
        return VOSVideo(name, video_idx, frames), segment_loader

    def __len__(self) -> int:
        return len(self.video_names)
