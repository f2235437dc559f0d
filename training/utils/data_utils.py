"""What a training sample is, before and after batching.

A dataset yields one `VideoDatapoint` per item: a short clip of `Frame`s, each carrying its
image and the `Object`s annotated on it. `collate_fn` turns a list of them into a
`BatchedVideoDatapoint`, a tensordict tensorclass laid out time-major, which is what the model
consumes frame by frame (`img_batch[t]` holds frame t of every video in the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image as PILImage
from tensordict import tensorclass
from torch import Tensor


@tensorclass
class BatchedVideoMetaData:
    """Identifiers that let a prediction be traced back to its source.

    unique_objects_identifier: [T, O, 3] int64, (video_id, object_id, frame_index) per object.
    frame_orig_size: [T, O, 2] int64, (height, width) of the source frame before transforms.
    """

    unique_objects_identifier: torch.LongTensor
    frame_orig_size: torch.LongTensor


@tensorclass
class BatchedVideoDatapoint:
    """A batch of B clips of T frames each, with O object masks per frame in total.

    img_batch: [T, B, 3, H, W] float images.
    obj_to_frame_idx: [T, O, 2] int32, (frame index t, video index b) that each object belongs to.
    masks: [T, O, H, W] bool ground-truth masks.
    metadata: `BatchedVideoMetaData` with [T, O, ...] fields.
    dict_key: name of the dataset the batch came from (selects the loss).
    The tensorclass batch size is [T], so `.to(device)` and `.pin_memory()` move every field.
    """

    img_batch: torch.FloatTensor
    obj_to_frame_idx: torch.IntTensor
    masks: torch.BoolTensor
    metadata: BatchedVideoMetaData

    dict_key: str

    def pin_memory(self, device: Any = None) -> BatchedVideoDatapoint:
        return self.apply(torch.Tensor.pin_memory, device=device)

    @property
    def num_frames(self) -> int:
        """T, the clip length."""
        return self.batch_size[0]

    @property
    def num_videos(self) -> int:
        """B, the number of clips in the batch."""
        return self.img_batch.shape[1]

    @property
    def flat_obj_to_img_idx(self) -> torch.IntTensor:
        """[T, O] row of each object's frame in `flat_img_batch` (video-major: b * T + t)."""
        frame_idx, video_idx = self.obj_to_frame_idx.unbind(dim=-1)
        return video_idx * self.num_frames + frame_idx

    @property
    def flat_img_batch(self) -> torch.FloatTensor:
        """[B * T, 3, H, W] images, all frames of video 0 first, then video 1, ..."""
        return self.img_batch.transpose(0, 1).flatten(0, 1)


@dataclass
class Object:
    """One annotated object on one frame."""

    object_id: int
    # Index of the frame in its source video (0 for a single image).
    frame_index: int
    # [H, W] uint8/bool mask, or a COCO RLE dict not yet decoded.
    segment: Tensor | dict


@dataclass
class Frame:
    """One frame: image data ([3, H, W] tensor, or a PIL image) and its objects."""

    data: Tensor | PILImage.Image
    objects: list[Object]


@dataclass
class VideoDatapoint:
    """One clip with its annotations; `size` is the (height, width) of the source frames."""

    frames: list[Frame]
    video_id: int
    size: tuple[int, int]


def collate_fn(batch: Sequence[VideoDatapoint], dict_key: str) -> BatchedVideoDatapoint:
    """Stack clips of equal length and frame size into one time-major batch.

    Objects are ordered per frame by video, then by their order within the video, so object o
    of frame t is `masks[t, o]` and belongs to video `obj_to_frame_idx[t, o, 1]`. Every frame
    of a clip must carry the same number of objects (VOSDataset's `always_target` does this).
    """
    if len(batch) == 0:
        raise ValueError("collate_fn got an empty batch; check the dataset length and batch size")
    num_frames = len(batch[0].frames)
    for video in batch:
        if len(video.frames) != num_frames:
            raise ValueError(
                f"all clips in a batch need the same number of frames, got {len(video.frames)} "
                f"(video {video.video_id}) and {num_frames}; set the sampler's num_frames"
            )
    first = batch[0].frames[0].data
    # One copy into the batch tensor instead of stacking frames, then clips.
    img_batch = torch.empty((num_frames, len(batch), *first.shape), dtype=first.dtype)
    for video_idx, video in enumerate(batch):
        for t, frame in enumerate(video.frames):
            img_batch[t, video_idx].copy_(frame.data)

    masks, obj_to_frame, identifiers, orig_sizes = [], [], [], []
    for t in range(num_frames):
        frame_masks, frame_index, frame_ids, frame_sizes = [], [], [], []
        for video_idx, video in enumerate(batch):
            objects = video.frames[t].objects
            frame_masks.extend(obj.segment for obj in objects)
            frame_index.extend((t, video_idx) for _ in objects)
            frame_ids.extend((int(video.video_id), int(obj.object_id), int(obj.frame_index)) for obj in objects)
            frame_sizes.extend(tuple(video.size) for _ in objects)
        if not frame_masks:
            raise ValueError(
                f"frame {t} of every clip in the batch has no objects; the sampler must pick at "
                "least one object visible on the first frame"
            )
        masks.append(torch.stack(frame_masks).to(torch.bool))
        obj_to_frame.append(frame_index)
        identifiers.append(frame_ids)
        orig_sizes.append(frame_sizes)

    num_objects = {len(m) for m in masks}
    if len(num_objects) != 1:
        raise ValueError(
            f"frames of a batch carry different object counts {sorted(num_objects)}; "
            "use VOSDataset(always_target=True) so absent objects get empty masks"
        )
    return BatchedVideoDatapoint(
        img_batch=img_batch,
        obj_to_frame_idx=torch.tensor(obj_to_frame, dtype=torch.int),
        masks=torch.stack(masks),
        metadata=BatchedVideoMetaData(
            unique_objects_identifier=torch.tensor(identifiers, dtype=torch.long),
            frame_orig_size=torch.tensor(orig_sizes, dtype=torch.long),
        ),
        dict_key=dict_key,
        batch_size=[num_frames],
    )
