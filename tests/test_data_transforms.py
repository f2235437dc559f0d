"""Clip transforms: images and masks stay aligned, consistent transforms share one draw, masks stay binary."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F1
import torchvision.transforms.v2.functional as F
from PIL import Image

from training.dataset import transforms as T
from training.dataset.clip_ops import clip_tensor
from training.dataset.color_ops import (
    adjust_brightness_,
    adjust_contrast_,
    adjust_saturation_,
)
from training.dataset.geometry import warp_affine, warp_images_pil, warp_masks_nearest
from training.utils.data_utils import Frame, Object, VideoDatapoint

H, W = 16, 24
MARK = torch.tensor([250, 10, 20], dtype=torch.uint8)


def marked_clip(num_frames: int = 3, box=(3, 5, 9, 12)) -> VideoDatapoint:
    """Frames with a red box on a dark background; object 1 is exactly that box."""
    top, left, bottom, right = box
    frames = []
    for t in range(num_frames):
        image = torch.full((3, H, W), 30, dtype=torch.uint8)
        image[:, top:bottom, left:right] = MARK[:, None, None]
        mask = torch.zeros(H, W, dtype=torch.uint8)
        mask[top:bottom, left:right] = 1
        frames.append(Frame(data=image, objects=[Object(object_id=1, frame_index=t, segment=mask)]))
    return VideoDatapoint(frames=frames, video_id=0, size=(H, W))


def red_pixels(image: torch.Tensor) -> torch.Tensor:
    return (image[0] > 200) & (image[1] < 60)


def test_flip_moves_image_and_mask_together():
    clip = T.RandomHorizontalFlip(consistent_transform=True, p=1.0)(marked_clip())
    for frame in clip.frames:
        mask = frame.objects[0].segment
        assert mask[3:9, W - 12 : W - 5].all() and mask.sum() == 6 * 7
        assert torch.equal(red_pixels(frame.data), mask.bool())


def test_resize_scales_mask_box_exactly_and_keeps_it_binary():
    clip = T.RandomResizeAPI(sizes=32, consistent_transform=True)(marked_clip())  # shorter side 16 -> 32
    for frame in clip.frames:
        mask = frame.objects[0].segment
        assert frame.data.shape == (3, 32, 48) and mask.shape == (32, 48)
        assert set(mask.unique().tolist()) == {0, 1}
        assert mask[6:18, 10:24].all() and mask.sum() == 12 * 14


def test_square_resize_and_max_size():
    clip = T.RandomResizeAPI(sizes=20, consistent_transform=True, square=True)(marked_clip())
    assert clip.frames[0].data.shape == (3, 20, 20) and clip.frames[0].objects[0].segment.shape == (20, 20)
    clip = T.RandomResizeAPI(sizes=32, consistent_transform=True, max_size=36)(marked_clip())
    assert clip.frames[0].data.shape == (3, 24, 36)


def test_quarter_turn_affine_rotates_image_and_mask_alike():
    square = 16
    clip = marked_clip(2, box=(2, 3, 6, 12))
    for frame in clip.frames:
        frame.data = frame.data[:, :, :square].contiguous()
        frame.objects[0].segment = frame.objects[0].segment[:, :square].contiguous()
    before = [f.objects[0].segment.clone() for f in clip.frames]
    clip = T.RandomAffine(degrees=[90, 90], consistent_transform=True, image_interpolation="bilinear")(clip)
    for frame, mask in zip(clip.frames, before):
        expected = torch.rot90(mask, k=-1, dims=(0, 1))  # as torchvision: +90 degrees is rot90 k=-1
        assert torch.equal(frame.objects[0].segment, expected)
        assert torch.equal(red_pixels(frame.data), expected.bool())


def test_affine_that_loses_the_object_is_skipped():
    affine = T.RandomAffine(degrees=0, consistent_transform=True, translate=[1.0, 1.0], log_warning=False)
    torch.manual_seed(0)
    skipped = moved = 0
    for _ in range(20):
        original = marked_clip(2)
        clip = affine(marked_clip(2))
        first_mask = clip.frames[0].objects[0].segment
        assert first_mask.sum() > 0  # a draw that emptied the first-frame mask is never kept
        if torch.equal(first_mask, original.frames[0].objects[0].segment):
            assert torch.equal(clip.frames[1].data, original.frames[1].data)
            skipped += 1
        else:
            moved += 1
    assert skipped > 0 and moved > 0


def test_consistent_jitter_shares_parameters_and_inconsistent_does_not():
    torch.manual_seed(0)
    clip = T.ColorJitter(consistent_transform=True, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1)(marked_clip())
    assert torch.equal(clip.frames[0].data, clip.frames[1].data) and torch.equal(clip.frames[1].data, clip.frames[2].data)
    clip = T.ColorJitter(consistent_transform=False, brightness=0.5, contrast=0.5, saturation=0.5, hue=None)(marked_clip())
    assert not torch.equal(clip.frames[0].data, clip.frames[1].data)


def test_brightness_factor_is_applied_exactly():
    clip = T.ColorJitter(consistent_transform=True, brightness=[2.0, 2.0], contrast=None, saturation=None, hue=None)(
        marked_clip(1)
    )
    expected = (marked_clip(1).frames[0].data.float() / 255 * 2).clamp(0, 1)
    torch.testing.assert_close(clip.frames[0].data, expected)


def test_grayscale_and_normalize():
    random.seed(0)
    clip = T.ComposeAPI([
        T.RandomGrayscale(consistent_transform=True, p=1.0),
        T.ToTensorAPI(),
        T.NormalizeAPI(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
    ])(marked_clip(2))
    gray = 0.2989 * 250 + 0.587 * 10 + 0.114 * 20
    value = clip.frames[1].data[:, 4, 6]
    torch.testing.assert_close(value, torch.full((3,), (gray / 255 - 0.5) / 0.25), atol=2e-2, rtol=0)
    assert clip.frames[0].data.dtype == torch.float32


def test_non_consistent_flip_draws_per_frame():
    random.seed(3)
    clip = T.RandomHorizontalFlip(consistent_transform=False, p=0.5)(marked_clip(8))
    flipped = [bool(f.objects[0].segment[3, W - 6]) for f in clip.frames]
    assert any(flipped) and not all(flipped)
    for frame in clip.frames:
        assert torch.equal(red_pixels(frame.data), frame.objects[0].segment.bool())


def test_mose_pipeline_keeps_masks_binary_and_aligned():
    torch.manual_seed(1)
    random.seed(1)
    mose = T.ComposeAPI([
        T.RandomHorizontalFlip(consistent_transform=True),
        T.RandomAffine(degrees=25, shear=20, image_interpolation="bilinear", consistent_transform=True),
        T.RandomResizeAPI(sizes=32, square=True, consistent_transform=True),
        T.ToTensorAPI(),
    ])
    clip = mose(marked_clip(3))
    for frame in clip.frames:
        mask = frame.objects[0].segment
        assert set(mask.unique().tolist()) <= {0, 1} and mask.sum() > 0
        red = red_pixels((frame.data * 255).round())
        # Interpolated borders may differ; the interiors must coincide.
        overlap = (red & mask.bool()).sum() / mask.sum()
        assert overlap > 0.6


AFFINE_PARAMS = [(17.0, [2, -3], 1.1, [8.0, -4.0]), (-30.0, [0, 0], 0.9, [0.0, 0.0]), (24.6, [1, 1], 1.0, [-19.3, 0.0])]


@pytest.mark.parametrize("params", AFFINE_PARAMS)
def test_warp_affine_matches_torchvision_geometry(params):
    """The float warp uses torchvision's affine convention (checked on its bilinear)."""
    clip = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = warp_affine(clip, params, "bilinear", fill=[123.0, 116.0, 103.0])
    theirs = F.affine(clip, *params, interpolation=F.InterpolationMode.BILINEAR, fill=[123.0, 116.0, 103.0])
    assert (ours.int() - theirs.int()).abs().max() <= 1
    bicubic = warp_affine(clip, params, "bicubic", fill=[123.0, 116.0, 103.0])
    assert bicubic.dtype == torch.uint8 and (bicubic.float() - theirs.float()).abs().mean() < 12


@pytest.mark.parametrize("params", AFFINE_PARAMS)
def test_mask_warp_picks_torchvisions_nearest_pixels_exactly(params):
    masks = (torch.rand(11, 37, 53, generator=torch.Generator().manual_seed(1)) < 0.5).to(torch.uint8)
    theirs = F.affine(masks, *params, interpolation=F.InterpolationMode.NEAREST, fill=0.0)
    assert torch.equal(warp_masks_nearest(masks, params), theirs)


def test_pil_image_warp_is_the_official_operation():
    clip = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    params = AFFINE_PARAMS[0]
    ours = warp_images_pil(clip, params, "bilinear", [123, 116, 103])
    for image, out in zip(clip, ours):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        expected = np.asarray(F1.affine(pil, *params, interpolation=F1.InterpolationMode.BILINEAR, fill=[123, 116, 103]))
        assert torch.equal(out.permute(1, 2, 0), torch.from_numpy(expected.copy()))


@pytest.mark.parametrize("op, theirs", [
    (adjust_brightness_, F.adjust_brightness), (adjust_contrast_, F.adjust_contrast),
    (adjust_saturation_, F.adjust_saturation),
])
def test_in_place_colour_ops_equal_torchvision(op, theirs):
    clip = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(3))
    for factor in (0.7, 1.3):
        torch.testing.assert_close(op(clip.clone(), factor), theirs(clip, factor), rtol=0, atol=1e-6)


def test_clip_views_are_reused_without_copy():
    clip = torch.rand(4, 3, H, W).contiguous(memory_format=torch.channels_last)
    frames = [Frame(data=image, objects=[]) for image in clip.unbind(0)]
    again = clip_tensor(frames)
    assert again.data_ptr() == clip.data_ptr() and torch.equal(again, clip)
    separate = [Frame(data=image.clone(), objects=[]) for image in clip.unbind(0)]
    assert torch.equal(clip_tensor(separate), clip)


def test_mosaic_keeps_the_objects_in_one_cell_only():
    random.seed(0)
    torch.manual_seed(0)
    clip = T.RandomMosaicVideoAPI(prob=1.0, grid_h=2, grid_w=2, use_random_hflip=True)(marked_clip(2))
    cells = []
    for frame in clip.frames:
        mask = frame.objects[0].segment
        assert mask.shape == (H, W) and set(mask.unique().tolist()) == {0, 1}
        red = red_pixels(frame.data)
        rows, cols = torch.nonzero(mask, as_tuple=True)
        cells.append((int(rows.min()) // (H // 2), int(cols.min()) // (W // 2)))
        assert (red & mask.bool()).sum() == mask.sum()  # the mask sits on its (downsized) box
        assert red.sum() > 3 * mask.sum()  # distractor copies of the box in the other cells
    assert cells[0] == cells[1]  # same target cell on every frame
