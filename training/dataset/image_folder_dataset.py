"""Plain image datasets: images/ and masks/ side by side, each image a one-frame video.

    dataset/images/cat.jpg   <->   dataset/masks/cat.png

Images may have any common extension; masks are PNGs with the same file stem, either id maps
(palettised or 8/16-bit grayscale, each non-zero value an object) or binary masks (one object).
Use it in a config as `video_dataset` of a VOSDataset:

    video_dataset:
      _target_: training.dataset.vos_raw_dataset.ImageFolderRawDataset
      img_folder: dataset/images
      gt_folder: dataset/masks
"""

from __future__ import annotations

import logging
import os
from collections import Counter

from torch import Tensor

from training.dataset.decoding import IMAGE_EXTENSIONS, DatasetError, read_id_map
from training.dataset.video_types import (
    VOSFrame,
    VOSRawDataset,
    VOSVideo,
    read_name_list,
)
from training.dataset.vos_segment_loader import split_id_map

logger = logging.getLogger(__name__)

MASK_EXTENSIONS = (".png",)


class SingleMaskSegmentLoader:
    """Segments of an image whose single mask PNG annotates every frame of the (repeated) clip."""

    def __init__(self, mask_path: str) -> None:
        self.mask_path = mask_path
        self._cache: dict[int, Tensor] | None = None

    def annotated_frame_ids(self) -> set[int]:
        return {0}

    def load(self, frame_id: int) -> dict[int, Tensor]:
        # Frames of an image clip are copies of one image, so decode its mask once.
        if self._cache is None:
            self._cache = split_id_map(read_id_map(self.mask_path))
        return self._cache


def stems_by_name(folder: str, extensions: tuple[str, ...]) -> dict[str, str]:
    """stem -> file name for the files of `folder` with one of `extensions`; stems must be unique."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(extensions))
    counts = Counter(os.path.splitext(n)[0] for n in names)
    dupes = sorted(s for s, c in counts.items() if c > 1)
    if dupes:
        raise DatasetError(
            f"{folder} holds several files with the same name stem {dupes[:5]}; images and masks are "
            "matched by stem, so keep one file per stem"
        )
    return {os.path.splitext(n)[0]: n for n in names}


def match_images_and_masks(img_folder: str, gt_folder: str) -> tuple[dict[str, str], dict[str, str]]:
    """(stem -> image name, stem -> mask name) for the two folders, without checking that they pair up."""
    for folder, role in ((img_folder, "img_folder"), (gt_folder, "gt_folder")):
        if folder is None or not os.path.isdir(folder):
            raise DatasetError(f"{role} {folder!r} is not a folder; point it at your images/ or masks/ folder")
    return stems_by_name(img_folder, IMAGE_EXTENSIONS), stems_by_name(gt_folder, MASK_EXTENSIONS)


class ImageFolderRawDataset(VOSRawDataset):
    """images/ + masks/ matched by file stem; each image becomes a clip of `num_frames` copies.

    file_list_txt / excluded_videos_list_txt name image stems to use / skip. An image without a
    mask is an error (it cannot train; add its mask or leave it out through file_list_txt); a
    mask without an image is ignored with a warning.
    """

    def __init__(
        self,
        img_folder: str,
        gt_folder: str,
        file_list_txt: str | None = None,
        excluded_videos_list_txt: str | None = None,
        num_frames: int = 1,
    ) -> None:
        self.img_folder = img_folder
        self.gt_folder = gt_folder
        self.num_frames = num_frames
        images, masks = match_images_and_masks(img_folder, gt_folder)
        if file_list_txt is not None:
            stems = read_name_list(file_list_txt)
            unknown = [s for s in stems if s not in images]
            if unknown:
                raise DatasetError(
                    f"{len(unknown)} images named in {file_list_txt} are not in {img_folder}: {unknown[:5]}"
                )
        else:
            stems = sorted(images)
        excluded = set(read_name_list(excluded_videos_list_txt))
        stems = [s for s in stems if s not in excluded]
        if not stems:
            raise DatasetError(
                f"no images found in {img_folder} (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                "expected images/<name>.jpg with masks/<name>.png"
            )
        without_mask = [s for s in stems if s not in masks]
        if without_mask:
            raise DatasetError(
                f"{len(without_mask)} images in {img_folder} have no mask <stem>.png in {gt_folder}: "
                f"{[images[s] for s in without_mask[:5]]}; add the masks or exclude the images"
            )
        orphans = set(masks) - set(images)
        if orphans:
            logger.warning("%d masks in %s have no image and are ignored, e.g. %s", len(orphans), gt_folder,
                            sorted(orphans)[:3])
        self.video_names = stems
        self.image_paths = [os.path.join(img_folder, images[s]) for s in stems]
        self.mask_paths = [os.path.join(gt_folder, masks[s]) for s in stems]

    def get_video(self, idx: int) -> tuple[VOSVideo, SingleMaskSegmentLoader]:
        frames = [VOSFrame(0, image_path=self.image_paths[idx]) for _ in range(self.num_frames)]
        return VOSVideo(self.video_names[idx], idx, frames), SingleMaskSegmentLoader(self.mask_paths[idx])

    def __len__(self) -> int:
        return len(self.video_names)
