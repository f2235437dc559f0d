"""VOSDataset: raw video + sampler + transforms -> one training clip (`VideoDatapoint`)."""

from __future__ import annotations

import logging
import random

import torch
from torch import Tensor
from torch.utils.data import Dataset

from training.dataset.decoding import CorruptImageError, DatasetError, read_image
from training.dataset.video_types import VOSFrame, VOSRawDataset, VOSVideo
from training.dataset.vos_sampler import SampledFramesAndObjects, VOSSampler
from training.dataset.vos_segment_loader import JSONSegmentLoader
from training.utils.data_utils import Frame, Object, VideoDatapoint

logger = logging.getLogger(__name__)

MAX_RETRIES = 100


class VOSDataset(Dataset):
    """Draws a clip from a raw video dataset, loads its frames and masks, and transforms it.

    Every sampled object gets a mask on every frame (`always_target`): an object absent from a
    frame gets an empty mask, or with always_target=False is left out of that frame.
    `multiplier` sets each video's repeat factor (see RepeatFactorWrapper).

    Bad data policy. A corrupt or truncated frame image (say one bad JPEG in the middle of a
    video) is skipped by default: the frame is dropped from its video for the rest of the run,
    a warning with the running count of skipped frames is logged (`num_skipped_frames`), and a
    new clip is drawn from the same video. With `strict=True` it raises a DatasetError naming the
    file instead. Other data problems (missing masks, a mask whose size differs from its frame,
    a video with too few annotated frames or no visible object) make a training dataset log a
    warning and draw another video, up to `max_retries` times in a row; with `strict=True`, or
    when `training` is False, they raise. `python -m training.tools.check_dataset` lists all of
    them before a run.
    """

    def __init__(
        self,
        transforms: list,
        training: bool,
        video_dataset: VOSRawDataset,
        sampler: VOSSampler,
        multiplier: float,
        always_target: bool = True,
        target_segments_available: bool = True,
        strict: bool = False,
        max_retries: int = MAX_RETRIES,
    ) -> None:
        self._transforms = list(transforms) if transforms is not None else []
        self.training = training
        self.video_dataset = video_dataset
        self.sampler = sampler
        self.repeat_factors = torch.full((len(video_dataset),), float(multiplier), dtype=torch.float32)
        self.curr_epoch = 0
        self.always_target = always_target
        self.target_segments_available = target_segments_available
        self.strict = strict
        self.max_retries = max_retries
        self.corrupt_frames: set[str] = set()
        self.num_skipped_frames = 0
        logger.info("VOSDataset over %d raw videos", len(video_dataset))

    def set_epoch(self, epoch: int) -> None:
        self.curr_epoch = epoch

    def __len__(self) -> int:
        return len(self.video_dataset)

    def __getitem__(self, idx: int | Tensor) -> VideoDatapoint:
        idx = int(idx)
        for _ in range(self.max_retries):
            try:
                datapoint = self._load_clip(idx)
                break
            except CorruptImageError as exc:
                self._skip_corrupt_frame(exc)
            except DatasetError as exc:
                if self.strict or not self.training:
                    raise
                logger.warning("skipping video %d of %d: %s", idx, len(self), exc)
                idx = random.randrange(0, len(self.video_dataset))
        else:
            raise DatasetError(
                f"{self.max_retries} clip draws in a row failed (last: video index {idx}); the dataset is "
                "mostly unusable, run python -m training.tools.check_dataset on it"
            )
        for transform in self._transforms:
            datapoint = transform(datapoint, epoch=self.curr_epoch)
        return datapoint

    def _load_clip(self, idx: int) -> VideoDatapoint:
        video, segment_loader = self.video_dataset.get_video(idx)
        if self.corrupt_frames:
            video.frames = [f for f in video.frames if f.image_path not in self.corrupt_frames]
        sampled = self.sampler.sample(video, segment_loader, epoch=self.curr_epoch)
        return self.construct(video, sampled, segment_loader)

    def _skip_corrupt_frame(self, exc: CorruptImageError) -> None:
        if self.strict or exc.path is None:
            raise exc
        self.corrupt_frames.add(exc.path)
        self.num_skipped_frames += 1
        logger.warning(
            "skipped corrupt frame %s (%d skipped so far in this process; strict=True makes this an error): %s",
            exc.path, self.num_skipped_frames, exc,
        )

    def construct(self, video: VOSVideo, sampled: SampledFramesAndObjects, segment_loader) -> VideoDatapoint:
        """Load the sampled frames and the sampled objects' masks into a VideoDatapoint."""
        images = load_images(sampled.frames)
        frames = []
        for vos_frame, image in zip(sampled.frames, images):
            height, width = image.shape[-2:]
            if isinstance(segment_loader, JSONSegmentLoader):
                segments = segment_loader.load(vos_frame.frame_idx, obj_ids=sampled.object_ids)
            else:
                segments = segment_loader.load(vos_frame.frame_idx)
            objects = []
            for obj_id in sampled.object_ids:
                segment = segments.get(obj_id)
                if segment is None:
                    if not self.always_target:
                        continue
                    segment = torch.zeros(height, width, dtype=torch.uint8)
                elif tuple(segment.shape) != (height, width):
                    raise DatasetError(
                        f"video {video.video_name} frame {vos_frame.frame_idx}: mask of object {obj_id} is "
                        f"{tuple(segment.shape)} but frame {vos_frame.image_path} is {(height, width)}; "
                        "masks must have their frame's size"
                    )
                objects.append(Object(object_id=obj_id, frame_index=vos_frame.frame_idx, segment=segment.to(torch.uint8)))
            frames.append(Frame(data=image, objects=objects))
        return VideoDatapoint(frames=frames, video_id=video.video_id, size=(int(height), int(width)))


def load_images(frames: list[VOSFrame]) -> list[Tensor]:
    """[3, H, W] uint8 image of each frame; a file repeated in the clip is decoded once."""
    decoded: dict[str, Tensor] = {}
    images = []
    for frame in frames:
        if frame.data is not None:
            data = frame.data
            # Transforms may work in place, so never hand them the dataset's own tensor.
            images.append((data * 255).to(torch.uint8) if data.is_floating_point() else data.clone())
            continue
        if frame.image_path not in decoded:
            decoded[frame.image_path] = read_image(frame.image_path)
            images.append(decoded[frame.image_path])
        else:
            images.append(decoded[frame.image_path].clone())
    return images
