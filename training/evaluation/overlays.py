"""Overlay pictures of evaluation samples: image, ground truth, prompt and prediction (PIL only).

Each sample becomes one PNG: a row per shown frame, with three panels side by side: the image
with the prompt (clicks as dots, green positive / red negative; boxes; a mask prompt as its
outline), the ground truth, and the prediction, objects in palette colours.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from training.evaluation.clicks import Click
from training.evaluation.metrics import boundary_map

# Distinct colours for objects 1, 2, ... (cycled).
OBJECT_COLOURS = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
    dtype=np.float32,
)
POSITIVE, NEGATIVE, BOX = (0, 255, 0), (255, 0, 0), (255, 255, 0)


@dataclass
class OverlaySample:
    """What to draw for one video or image.

    frames: the shown frames, `[H, W, 3]` uint8 each; frame_indices: their index in the clip.
    gt, pred: `[F, O, H, W]` bool for the F shown frames and O objects.
    clicks / boxes: per object, the prompt on the first shown frame (boxes as x0, y0, x1, y1).
    mask_prompt: the first frame was prompted with the ground-truth mask (drawn as outline).
    """

    name: str
    frames: list[np.ndarray]
    frame_indices: list[int]
    gt: np.ndarray
    pred: np.ndarray
    clicks: list[list[Click]] = field(default_factory=list)
    boxes: list[list[float] | None] = field(default_factory=list)
    mask_prompt: bool = False


def colour_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """`[H, W, 3]` uint8: `image` with each of the `[O, H, W]` masks blended in its colour."""
    out = image.astype(np.float32).copy()
    for index, mask in enumerate(masks):
        colour = OBJECT_COLOURS[index % len(OBJECT_COLOURS)]
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out.round().clip(0, 255).astype(np.uint8)


def _draw_prompts(panel: Image.Image, sample: OverlaySample, gt_first: np.ndarray) -> None:
    draw = ImageDraw.Draw(panel)
    radius = max(2, round(min(panel.size) / 60))
    for object_clicks in sample.clicks:
        for click in object_clicks:
            colour = POSITIVE if click.positive else NEGATIVE
            corners = [click.x - radius, click.y - radius, click.x + radius, click.y + radius]
            # A white rim keeps a green click visible on green objects and backgrounds.
            draw.ellipse(corners, fill=colour, outline=(255, 255, 255))
    for box in sample.boxes:
        if box is not None:
            draw.rectangle(box, outline=BOX, width=max(1, radius // 2))
    if sample.mask_prompt:
        pixels = np.asarray(panel).copy()
        for mask in gt_first:
            pixels[boundary_map(mask)] = BOX
        panel.paste(Image.fromarray(pixels))


def render_sample(sample: OverlaySample, *, min_height: int = 192) -> Image.Image:
    """The sample as one RGB image: rows = shown frames, columns = prompt | ground truth | prediction.

    Frames shorter than `min_height` are enlarged by a whole factor (nearest neighbour), so
    small validation images stay readable.
    """
    rows = []
    for row, image in enumerate(sample.frames):
        prompt_panel = Image.fromarray(image.copy())
        if row == 0:
            _draw_prompts(prompt_panel, sample, sample.gt[0])
        panels = [np.asarray(prompt_panel), colour_masks(image, sample.gt[row]), colour_masks(image, sample.pred[row])]
        rows.append(np.concatenate(panels, axis=1))
    picture = Image.fromarray(np.concatenate(rows, axis=0))
    factor = -(-min_height // sample.frames[0].shape[0])
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    return picture


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "sample"


def save_overlays(samples: list[OverlaySample], folder: str | os.PathLike, *, prefix: str = "") -> list[str]:
    """Write one PNG per sample into `folder` (created); returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, sample in enumerate(samples):
        path = os.path.join(folder, f"{prefix}{index:03d}_{_safe_name(sample.name)}.png")
        render_sample(sample).save(path)
        paths.append(path)
    return paths


def overlay_grid(samples: list[OverlaySample], *, max_width: int = 1024) -> np.ndarray:
    """`[H, W, 3]` uint8: rendered samples stacked vertically, each scaled to at most `max_width`
    wide and padded to a common width (for a TensorBoard image panel)."""
    if not samples:
        raise ValueError("overlay_grid needs at least one sample")
    pictures = []
    for sample in samples:
        picture = render_sample(sample)
        if picture.width > max_width:
            picture = picture.resize((max_width, max(1, round(picture.height * max_width / picture.width))))
        pictures.append(np.asarray(picture))
    width = max(p.shape[1] for p in pictures)
    padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in pictures]
    return np.concatenate(padded, axis=0)
