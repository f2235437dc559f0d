"""The raw-dataset interface: a video is a list of frames (image paths) plus a segment loader."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from iopath.common.file_io import g_pathmgr

from training.dataset.decoding import DatasetError


@dataclass
class VOSFrame:
    """One frame of a raw video: its id in the video (e.g. 17 for 00017.jpg) and its image."""

    frame_idx: int
    image_path: str
    # Already-decoded [3, H, W] image, when the dataset holds pixels instead of files.
    data: torch.Tensor | None = None
    is_conditioning_only: bool | None = False


@dataclass
class VOSVideo:
    video_name: str
    video_id: int
    frames: list[VOSFrame] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frames)


class VOSRawDataset:
    """Indexable collection of videos: `get_video(idx) -> (VOSVideo, segment_loader)`."""

    def get_video(self, idx: int):
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


def read_name_list(path: str | list | tuple | None) -> list[str]:
    """Names listed one per line in a text file (or several files), extensions stripped.

    Blank lines are ignored. `None` gives an empty list.
    """
    if path is None:
        return []
    paths = [path] if isinstance(path, str) else list(path)
    names: list[str] = []
    for one in paths:
        if not g_pathmgr.exists(one):
            raise DatasetError(f"name list {one} does not exist; fix the path or set it to null")
        with g_pathmgr.open(one, "r") as f:
            names.extend(os.path.splitext(line.strip())[0] for line in f if line.strip())
    return names
