"""Which frames and objects of a video make up one training clip.

Random draws go through Python's `random` module, in the order the official sampler makes
them (start frame, time reversal, object subset), so a seeded run picks the same clips.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from training.dataset.decoding import DatasetError
from training.dataset.video_types import VOSFrame, VOSVideo
from training.dataset.vos_segment_loader import LazySegments

MAX_RETRIES = 1000


@dataclass
class SampledFramesAndObjects:
    frames: list[VOSFrame]
    object_ids: list[int]


class VOSSampler:
    def __init__(self, sort_frames: bool = True) -> None:
        # Frames come ordered by frame id when sort_frames is True.
        self.sort_frames = sort_frames

    def sample(self, video: VOSVideo, segment_loader, epoch: int | None = None) -> SampledFramesAndObjects:
        raise NotImplementedError


def visible_object_ids(segment_loader, frame_idx: int) -> list[int]:
    """Ids of the objects with a non-empty mask on the frame, in the loader's order."""
    segments = segment_loader.load(frame_idx)
    if isinstance(segments, LazySegments):
        # SA-1B masks are non-empty by construction; decoding them all just to check is waste.
        return list(segments.keys())
    return [obj_id for obj_id, mask in segments.items() if mask is not None and bool(mask.any())]


class RandomUniformSampler(VOSSampler):
    """`num_frames` consecutive frames from a uniformly drawn start, and up to `max_num_objects`
    objects drawn among those visible on the clip's first frame.

    The clip is reversed in time with probability `reverse_time_prob`. A clip whose first frame
    shows no object is redrawn, at most `max_retries` times; then a DatasetError names the video.
    """

    def __init__(
        self, num_frames: int, max_num_objects: int, reverse_time_prob: float = 0.0, max_retries: int = MAX_RETRIES
    ) -> None:
        super().__init__()
        if num_frames < 1 or max_num_objects < 1:
            raise ValueError(f"num_frames ({num_frames}) and max_num_objects ({max_num_objects}) must be >= 1")
        self.num_frames = num_frames
        self.max_num_objects = max_num_objects
        self.reverse_time_prob = reverse_time_prob
        self.max_retries = max_retries

    def sample(self, video: VOSVideo, segment_loader, epoch: int | None = None) -> SampledFramesAndObjects:
        num_available = len(video.frames)
        if num_available < self.num_frames:
            raise DatasetError(
                f"cannot sample {self.num_frames} frames from video {video.video_name}: it has only "
                f"{num_available} annotated frames; lower num_frames or exclude the video"
            )
        num_starts = num_available - self.num_frames + 1
        num_clips = num_starts * (2 if 0 < self.reverse_time_prob < 1 else 1)
        visible_by_frame: dict[int, list[int]] = {}
        tried: set[tuple[int, bool]] = set()
        for _ in range(self.max_retries):
            start = random.randrange(0, num_starts)
            frames = video.frames[start : start + self.num_frames]
            reverse = random.uniform(0, 1) < self.reverse_time_prob
            if reverse:
                frames = frames[::-1]
            first = frames[0].frame_idx
            if first not in visible_by_frame:
                visible_by_frame[first] = visible_object_ids(segment_loader, first)
            visible = visible_by_frame[first]
            if visible:
                object_ids = random.sample(visible, min(len(visible), self.max_num_objects))
                return SampledFramesAndObjects(frames=frames, object_ids=object_ids)
            tried.add((start, reverse))
            if len(tried) == num_clips:
                break  # every possible clip starts on a frame without objects
        raise DatasetError(
            f"no object is visible on the first frame of any of {len(tried)} distinct clips drawn from video "
            f"{video.video_name}; its masks may be empty (check them with python -m training.tools.check_dataset)"
        )


class EvalSampler(VOSSampler):
    """Every frame and every object of the first frame, for evaluation."""

    def sample(self, video: VOSVideo, segment_loader, epoch: int | None = None) -> SampledFramesAndObjects:
        frames = sorted(video.frames, key=lambda f: f.frame_idx) if self.sort_frames else video.frames
        if not frames:
            raise DatasetError(f"video {video.video_name} has no frames")
        object_ids = list(segment_loader.load(frames[0].frame_idx).keys())
        if not object_ids:
            raise DatasetError(f"the first frame of video {video.video_name} has no objects")
        return SampledFramesAndObjects(frames=frames, object_ids=object_ids)
