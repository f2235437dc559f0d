"""Reading a video into the normalised, square frames the model consumes.

A video is a folder of JPEG frames named by their index (`00000.jpg`, `00001.jpg`, ...), or frames
already in memory: a list of `HxWx3` uint8 arrays or PIL images, or one `[T, H, W, 3]` uint8 array.
Each frame is resized to `image_size x image_size` the way PIL resizes by default, scaled to
[0, 1] and normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from threading import Thread

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")

FrameSource = str | os.PathLike | np.ndarray | Sequence[np.ndarray | Image.Image]


def _frame_to_tensor(frame: str | Image.Image | np.ndarray, image_size: int) -> tuple[Tensor, int, int]:
    """One frame (a file path or pixels) as `[3, image_size, image_size]` float32 in [0, 1], plus its
    original (height, width)."""
    if isinstance(frame, str):
        with Image.open(frame) as image:
            return _frame_to_tensor(image, image_size)
    if isinstance(frame, Tensor):
        frame = frame.cpu().numpy()
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(
                f"in-memory frames must be HxWx3 uint8 RGB arrays, got dtype {frame.dtype} and shape {frame.shape}; "
                "convert with `np.asarray(image.convert('RGB'))`"
            )
        frame = Image.fromarray(frame)
    width, height = frame.size
    pixels = np.asarray(frame.convert("RGB").resize((image_size, image_size)))
    # Divide in float64 before the float32 cast: the official loader rounds this way.
    image = torch.from_numpy(pixels / 255.0).permute(2, 0, 1).float()
    return image, height, width


def _normalizer(mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    return torch.tensor(mean, dtype=torch.float32)[:, None, None], torch.tensor(std, dtype=torch.float32)[:, None, None]


def list_jpeg_frames(folder: str | os.PathLike) -> list[str]:
    """Paths of the JPEG frames in `folder`, ordered by the integer in their file names."""
    names = [name for name in os.listdir(folder) if os.path.splitext(name)[1] in JPEG_SUFFIXES]
    if not names:
        raise FileNotFoundError(f"no JPEG frames (*.jpg, *.jpeg) in {folder}")
    try:
        names.sort(key=lambda name: int(os.path.splitext(name)[0]))
    except ValueError as exc:
        raise ValueError(f"JPEG frames in {folder} must be named by their frame index (e.g. 00000.jpg): {exc}") from exc
    return [os.path.join(folder, name) for name in names]


class AsyncVideoFrameLoader:
    """Frames of a JPEG folder, decoded on first access and by a background thread.

    Indexing returns `[3, image_size, image_size]` normalised frames; `video_height` and
    `video_width` are known as soon as the loader exists (frame 0 is decoded eagerly, since it is
    where a user usually clicks first).
    """

    def __init__(
        self,
        img_paths: Sequence[str],
        image_size: int,
        offload_video_to_cpu: bool,
        img_mean: Tensor,
        img_std: Tensor,
        compute_device: torch.device,
    ) -> None:
        self.img_paths = list(img_paths)
        self.image_size = image_size
        self.offload_video_to_cpu = offload_video_to_cpu
        self.img_mean, self.img_std = img_mean, img_std
        self.compute_device = compute_device
        self.images: list[Tensor | None] = [None] * len(self.img_paths)
        self.exception: BaseException | None = None
        self.video_height: int | None = None
        self.video_width: int | None = None
        self[0]
        self.thread = Thread(target=self._load_all, daemon=True)
        self.thread.start()

    def _load_all(self) -> None:
        try:
            for index in tqdm(range(len(self)), desc="frame loading (JPEG)"):
                self[index]
        except Exception as exc:  # noqa: BLE001 - any failure is re-raised in the caller's thread on next access
            self.exception = exc

    def __getitem__(self, index: int) -> Tensor:
        if self.exception is not None:
            raise RuntimeError("loading video frames failed in the background thread") from self.exception
        image = self.images[index]
        if image is None:
            image, self.video_height, self.video_width = _frame_to_tensor(self.img_paths[index], self.image_size)
            image = (image - self.img_mean) / self.img_std
            if not self.offload_video_to_cpu:
                image = image.to(self.compute_device, non_blocking=True)
            self.images[index] = image
        return image

    def __len__(self) -> int:
        return len(self.images)


def load_video_frames(
    video_path: FrameSource,
    image_size: int,
    offload_video_to_cpu: bool,
    img_mean: Sequence[float] = IMAGENET_MEAN,
    img_std: Sequence[float] = IMAGENET_STD,
    async_loading_frames: bool = False,
    compute_device: torch.device | str = "cpu",
) -> tuple[Tensor | AsyncVideoFrameLoader, int, int]:
    """Load a whole video as model input.

    Args:
        video_path: a folder of JPEG frames, a list of HxWx3 uint8 arrays or PIL images, or a
            `[T, H, W, 3]` uint8 array.
        image_size: side of the square frames the model takes.
        offload_video_to_cpu: keep frames in CPU memory instead of on `compute_device`.
        async_loading_frames: for a JPEG folder, decode frames lazily in a background thread.

    Returns:
        frames `[T, 3, image_size, image_size]` (or a lazy `AsyncVideoFrameLoader`), and the
        original video height and width.
    """
    compute_device = torch.device(compute_device)
    mean, std = _normalizer(img_mean, img_std)
    if isinstance(video_path, (str, os.PathLike)):
        if not os.path.isdir(video_path):
            raise NotImplementedError(
                f"{video_path} is not a folder of JPEG frames; only those (or frames in memory) are supported. "
                "Extract a video file's frames first, e.g. "
                "`ffmpeg -i video.mp4 -q:v 2 -start_number 0 <folder>/'%05d.jpg'`"
            )
        paths = list_jpeg_frames(video_path)
        if async_loading_frames:
            loader = AsyncVideoFrameLoader(paths, image_size, offload_video_to_cpu, mean, std, compute_device)
            return loader, loader.video_height, loader.video_width
        frames: Sequence[str | Image.Image | np.ndarray] = paths
        desc = "frame loading (JPEG)"
    else:
        frames = list(video_path)
        desc = "frame loading (in memory)"
        if not frames:
            raise ValueError("the in-memory video has no frames")
    images = torch.empty(len(frames), 3, image_size, image_size, dtype=torch.float32)
    for index, frame in enumerate(tqdm(frames, desc=desc, disable=len(frames) < 2)):
        images[index], video_height, video_width = _frame_to_tensor(frame, image_size)
    if not offload_video_to_cpu:
        images, mean, std = (
            images.to(compute_device),
            mean.to(compute_device),
            std.to(compute_device),
        )
    images -= mean
    images /= std
    return images, video_height, video_width
