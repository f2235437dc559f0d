"""Evaluation samples: whole videos (or images) at their original resolution.

Evaluation reads the same raw datasets as training (`PNGRawDataset`, `ImageFolderRawDataset`,
SA-1B, SA-V), but none of the training transforms: every frame, full size, objects as they are.
Training-time batches (`BatchedVideoDatapoint`, already resized and normalised) are turned into
the same `EvalClip`s by `clips_from_batch`, so one scoring path serves both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sam2.utils.video_frames import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class EvalClip:
    """One video (or image, T = 1) to evaluate.

    frames: T frames, each an `[H, W, 3]` uint8 array, or (from a training batch) an already
        normalised `[T, 3, S, S]` model-input tensor.
    gt_masks: `[T, O, H, W]` bool ground truth of the O objects, empty where an object is absent.
    object_ids: the O object ids, as in the annotation files.
    """

    name: str
    frames: list[np.ndarray] | Tensor
    gt_masks: np.ndarray
    object_ids: list[int]

    @property
    def num_frames(self) -> int:
        return int(self.gt_masks.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.gt_masks.shape[-2]), int(self.gt_masks.shape[-1])

    def rgb_frame(self, index: int) -> np.ndarray:
        """`[H, W, 3]` uint8 frame for overlays (a normalised tensor frame is un-normalised)."""
        if isinstance(self.frames, Tensor):
            mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
            std = torch.tensor(IMAGENET_STD)[:, None, None]
            pixels = (self.frames[index].float().cpu() * std + mean).clamp(0, 1) * 255
            image = pixels.round().byte().permute(1, 2, 0).numpy()
            if image.shape[:2] != self.size:
                image = np.asarray(Image.fromarray(image).resize(self.size[::-1]))
            return image
        return self.frames[index]


def _read_rgb(frame) -> np.ndarray:
    if frame.data is not None:
        data = frame.data
        if isinstance(data, Tensor):
            data = data.permute(1, 2, 0).cpu().numpy()
            if data.dtype != np.uint8:
                data = (np.clip(data, 0, 1) * 255).round().astype(np.uint8)
        return np.asarray(data)
    with Image.open(frame.image_path) as image:
        return np.asarray(image.convert("RGB"))


def _mask_array(mask, size: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.zeros(size, dtype=bool)
    if isinstance(mask, Tensor):
        mask = mask.cpu().numpy()
    return np.asarray(mask).astype(bool)


def read_raw_video(dataset, index: int, *, max_frames: int | None = None) -> EvalClip:
    """Video `index` of a raw dataset (`get_video(idx) -> (VOSVideo, segment_loader)`).

    The objects are those annotated on the first frame; on later frames an object missing
    from the annotation has an empty mask (it left the scene). Objects that only appear later
    are not evaluated: semi-supervised VOS prompts every object on the first frame.
    """
    video, loader = dataset.get_video(index)
    frames = video.frames if max_frames is None else video.frames[:max_frames]
    images = [_read_rgb(frame) for frame in frames]
    size = images[0].shape[:2]
    first = loader.load(frames[0].frame_idx)
    object_ids = sorted(int(k) for k in first.keys() if first[k] is not None and _mask_array(first[k], size).any())
    gt = np.zeros((len(frames), len(object_ids), *size), dtype=bool)
    for t, frame in enumerate(frames):
        segments = first if t == 0 else loader.load(frame.frame_idx)
        for o, obj_id in enumerate(object_ids):
            if obj_id in segments:
                mask = _mask_array(segments[obj_id], size)
                if mask.shape != size:
                    raise ValueError(
                        f"video {video.video_name}: mask of object {obj_id} on frame {frame.frame_idx} is "
                        f"{mask.shape[0]}x{mask.shape[1]} but the frame is {size[0]}x{size[1]}; masks must "
                        "match their frames"
                    )
                gt[t, o] = mask
    return EvalClip(video.video_name, images, gt, object_ids)


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The given rank / world size, else the initialised process group's, else (0, 1)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    return rank, world_size


def iter_raw_dataset(
    dataset, *, rank: int = 0, world_size: int = 1, max_items: int | None = None, max_frames: int | None = None
) -> Iterator[EvalClip]:
    """This rank's share of the first `max_items` videos: every `world_size`-th from `rank` on."""
    count = len(dataset) if max_items is None else min(max_items, len(dataset))
    for index in range(rank, count, world_size):
        yield read_raw_video(dataset, index, max_frames=max_frames)


def clips_from_batch(batch) -> list[EvalClip]:
    """The B clips of a `BatchedVideoDatapoint` (frames stay normalised model inputs).

    Objects are those whose first-frame mask is not empty; names are `video<video_id>`.
    """
    masks = batch.masks.cpu().numpy()
    owners = batch.obj_to_frame_idx[0, :, 1].cpu().tolist()
    identifiers = batch.metadata.unique_objects_identifier[0].cpu().tolist()
    clips = []
    for video_index in range(batch.num_videos):
        objects = [o for o, owner in enumerate(owners) if owner == video_index and masks[0, o].any()]
        if not objects:
            continue
        video_id = identifiers[objects[0]][0]
        clips.append(
            EvalClip(
                name=f"video{video_id}",
                frames=batch.img_batch[:, video_index],
                gt_masks=masks[:, objects],
                object_ids=[int(identifiers[o][1]) for o in objects],
            )
        )
    return clips
