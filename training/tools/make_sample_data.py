"""Writes a small synthetic image dataset for the quickstart: `python -m training.tools.make_sample_data DIR`.

DIR/images/sample_<n>.jpg hold a few coloured shapes on a textured background; DIR/masks/sample_<n>.png
are palettised PNGs in which each shape has its own object id (0 is background) — the same layout
as your own `dataset/images` + `dataset/masks`.
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
from PIL import Image, ImageDraw

# Object ids 1.. get distinct colours in the mask palette, so masks are easy to eyeball.
PALETTE = [0, 0, 0, 230, 25, 75, 60, 180, 75, 255, 225, 25, 0, 130, 200, 245, 130, 48, 145, 30, 180]


def draw_sample(size: int, num_objects: int, rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """(RGB image, palettised id mask) of `num_objects` non-overlapping-ish shapes."""
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(60, 120, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    mask = Image.new("P", (size, size), 0)
    mask.putpalette(PALETTE + [0] * (768 - len(PALETTE)))
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for object_id in range(1, num_objects + 1):
        extent = rng.randint(size // 5, size // 2)
        left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
        box = (left, top, left + extent, top + extent)
        colour = tuple(rng.randint(140, 255) for _ in range(3))
        shape = draw_image.ellipse if object_id % 2 else draw_image.rectangle
        shape(box, fill=colour)
        (draw_mask.ellipse if object_id % 2 else draw_mask.rectangle)(box, fill=object_id)
    return image, mask


def make_sample_data(root: str, *, num_images: int = 8, size: int = 128, max_objects: int = 3, seed: int = 0) -> tuple[str, str]:
    """Writes the dataset under `root`; returns (img_folder, gt_folder)."""
    img_folder, gt_folder = os.path.join(root, "images"), os.path.join(root, "masks")
    os.makedirs(img_folder, exist_ok=True)
    os.makedirs(gt_folder, exist_ok=True)
    rng = random.Random(seed)
    for index in range(num_images):
        image, mask = draw_sample(size, rng.randint(1, max_objects), rng)
        image.save(os.path.join(img_folder, f"sample_{index:03d}.jpg"), quality=90)
        mask.save(os.path.join(gt_folder, f"sample_{index:03d}.png"))
    return img_folder, gt_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="examples/sample_data", help="output folder")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    img_folder, gt_folder = make_sample_data(args.root, num_images=args.num_images, size=args.size, seed=args.seed)
    print(f"wrote {args.num_images} images to {img_folder} and their masks to {gt_folder}")


if __name__ == "__main__":
    main()
