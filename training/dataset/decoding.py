"""Reading frames and masks from disk, and COCO run-length encoding.

Frames decode through torchvision.io (libjpeg-turbo / libpng) straight into uint8 tensors, which
gives the same pixels as PIL for JPEG without the PIL -> numpy -> tensor copies. Masks go
through PIL because it understands every PNG flavour users produce (palettised, 8/16-bit
grayscale, binary). Every failure names the file and says how to fix it.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor

try:  # torchvision deprecates its decoders in favour of torchcodec; PIL stays as the fallback.
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - future torchvision
    decode_image = None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A problem with the user's data (missing, unreadable or inconsistent files)."""


class CorruptFileError(DatasetError):
    """A file exists but cannot be decoded."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class CorruptImageError(CorruptFileError):
    """A frame image cannot be decoded (a mask problem raises CorruptFileError)."""


def read_image(path: str) -> Tensor:
    """Decode an image file into a [3, H, W] uint8 RGB tensor."""
    try:
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    if data.numel() == 0:
        raise CorruptImageError(f"image {path} is an empty file; re-extract or delete it", path)
    if decode_image is not None:
        try:
            return decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL decides below whether the file is corrupt or only unusual (CMYK, BMP, TIFF, ...)
    try:
        with PILImage.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"image {path} is corrupt or truncated ({exc}); re-extract or delete it", path) from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only."""
    try:
        with PILImage.open(path) as img:
            width, height = img.size
    except (OSError, SyntaxError) as exc:
        raise CorruptFileError(f"cannot read the header of {path} ({exc}); re-extract or delete it", path) from exc
    return height, width


def read_id_map(path: str) -> np.ndarray:
    """Decode a mask PNG into an [H, W] integer map of object ids (0 = background).

    Accepted: palettised PNGs (the palette index is the id, as in DAVIS/MOSE), 8- or 16-bit
    grayscale instance maps (the value is the id, so ids above 255 need 16 bits), 1-bit binary
    masks, and RGB images whose three channels are equal. A colour RGB mask is refused: its ids
    are ambiguous.
    """
    try:
        with PILImage.open(path) as img:
            mode = img.mode
            array = np.array(img)  # writable, so torch can wrap it without a copy warning
    except (OSError, SyntaxError) as exc:
        raise CorruptFileError(f"mask {path} cannot be decoded ({exc}); re-export or delete it", path) from exc
    if mode in ("P", "L", "I;16", "I;16B", "I;16L", "I"):
        return array
    if mode == "1":
        return array.astype(np.uint8)
    if mode == "PA" or mode == "LA":
        return array[..., 0]
    if mode in ("RGB", "RGBA"):
        rgb = array[..., :3]
        if (rgb == rgb[..., :1]).all():
            return rgb[..., 0]
        raise DatasetError(
            f"mask {path} is a colour RGB image, not a palettised or grayscale id map; save it as a "
            "palettised PNG (PIL: Image.fromarray(ids.astype(np.uint8), mode='P') with a palette) or "
            "as an 8/16-bit grayscale PNG whose pixel value is the object id"
        )
    raise DatasetError(f"mask {path} has unsupported PIL mode {mode!r}; save it as a palettised or grayscale PNG")


def object_ids_in_order(id_map: np.ndarray) -> np.ndarray:
    """Non-zero ids of an [H, W] map, in order of first appearance in raster order."""
    flat = id_map.reshape(-1)
    if flat.dtype.kind in "ui" and flat.size and int(flat.max()) < 1 << 16 and int(flat.min()) >= 0:
        # Counting is linear where np.unique sorts; then only the few present ids need locating.
        ids = np.flatnonzero(np.bincount(flat))
    else:
        ids = np.unique(flat)
    ids = ids[ids != 0]
    first = np.array([int(np.argmax(flat == i)) for i in ids], dtype=np.int64)
    return ids[np.argsort(first, kind="stable")].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# COCO RLE: a mask is read column by column (Fortran order) as alternating runs of 0s and 1s,
# starting with 0s. Compressed "counts" strings store each run, from the third on as a delta
# to the run two before, in 5-bit groups offset into printable ASCII (48 + value, bit 5 = more).


def _counts_from_string(counts: str) -> np.ndarray:
    runs: list[int] = []
    pos = 0
    data = counts.encode("ascii")
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            group = data[pos] - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return np.asarray(runs, dtype=np.int64)


def _counts_to_string(runs: np.ndarray) -> str:
    out = bytearray()
    for i, run in enumerate(runs.tolist()):
        value = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            if more:
                group |= 0x20
            out.append(group + 48)
    return out.decode("ascii")


def decode_rle(rle: dict) -> np.ndarray:
    """Decode a COCO RLE dict {"size": [H, W], "counts": str | list[int]} into an [H, W] uint8 mask."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _counts_from_string(counts) if isinstance(counts, str) else np.asarray(counts, dtype=np.int64)
    if runs.sum() != height * width or (runs < 0).any():
        raise DatasetError(f"RLE runs sum to {int(runs.sum())} but size {height}x{width} needs {height * width}")
    values = (np.arange(len(runs)) % 2).astype(np.uint8)
    flat = np.repeat(values, runs)
    return np.ascontiguousarray(flat.reshape(width, height).T)


def encode_rle(mask: np.ndarray) -> dict:
    """Encode an [H, W] binary mask as a compressed COCO RLE dict (inverse of `decode_rle`)."""
    height, width = mask.shape
    flat = (np.asarray(mask) != 0).T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds)
    if flat.size and flat[0] == 1:
        runs = np.concatenate([[0], runs])
    return {"size": [height, width], "counts": _counts_to_string(runs)}


def list_files(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Sorted names of the files in `folder` whose lower-cased extension is in `extensions`."""
    return sorted(name for name in os.listdir(folder) if name.lower().endswith(extensions))
