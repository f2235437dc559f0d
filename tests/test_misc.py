"""sam2/utils: connected components and hole filling, boxes, point prompts, frame loading, transforms."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from sam2.utils.misc import (
    concat_points,
    fill_holes_in_mask_scores,
    get_connected_components,
    load_video_frames,
    mask_to_box,
)
from sam2.utils.transforms import SAM2Transforms
from tests.reference import assert_close


def _flood_fill_areas(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain BFS over 8-neighbours: (component id per pixel, 0 on background; area per pixel)."""
    height, width = mask.shape
    component = np.zeros((height, width), dtype=np.int64)
    areas = np.zeros((height, width), dtype=np.int64)
    next_id = 0
    for y0 in range(height):
        for x0 in range(width):
            if not mask[y0, x0] or component[y0, x0]:
                continue
            next_id += 1
            component[y0, x0] = next_id
            members, queue = [], deque([(y0, x0)])
            while queue:
                y, x = queue.popleft()
                members.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not component[ny, nx]:
                            component[ny, nx] = next_id
                            queue.append((ny, nx))
            for y, x in members:
                areas[y, x] = len(members)
    return component, areas


def test_connected_components_join_diagonal_neighbours():
    mask = torch.tensor(
        [
            [1, 0, 0, 0, 1],
            [0, 1, 0, 0, 1],
            [0, 0, 0, 0, 0],
            [1, 1, 0, 1, 0],
        ],
        dtype=torch.bool,
    )[None, None]
    labels, counts = get_connected_components(mask)
    # components: {(0,0),(1,1)} diagonal, {(0,4),(1,4)}, {(3,0),(3,1)}, {(3,3)}; label = 1 + first pixel index
    expected_labels = torch.tensor(
        [[1, 0, 0, 0, 5], [0, 1, 0, 0, 5], [0, 0, 0, 0, 0], [16, 16, 0, 19, 0]],
        dtype=torch.int32,
    )
    expected_counts = torch.tensor(
        [[2, 0, 0, 0, 2], [0, 2, 0, 0, 2], [0, 0, 0, 0, 0], [2, 2, 0, 1, 0]],
        dtype=torch.int32,
    )
    assert torch.equal(labels[0, 0], expected_labels)
    assert torch.equal(counts[0, 0], expected_counts)
    assert labels.dtype == counts.dtype == torch.int32


@pytest.mark.parametrize("density", [0.3, 0.55, 0.8])
def test_connected_components_match_flood_fill(density):
    generator = torch.Generator().manual_seed(int(density * 100))
    masks = torch.rand(3, 1, 23, 31, generator=generator) < density
    labels, counts = get_connected_components(masks)
    for mask, label, count in zip(masks[:, 0].numpy(), labels[:, 0].numpy(), counts[:, 0].numpy()):
        component, areas = _flood_fill_areas(mask)
        assert np.array_equal(count, areas)
        assert np.array_equal(label > 0, mask)
        # same partition: pixels share a label exactly when they share a flood-fill component
        for comp_id in range(1, component.max() + 1):
            assert len(np.unique(label[component == comp_id])) == 1
        assert len(np.unique(label[mask])) == component.max()


def test_connected_components_of_a_long_snake_are_one_component():
    snake = torch.zeros(1, 1, 40, 40, dtype=torch.bool)
    snake[0, 0, ::2, :] = True
    snake[0, 0, 1::4, -1] = True
    snake[0, 0, 3::4, 0] = True
    labels, counts = get_connected_components(snake)
    assert labels[snake].unique().tolist() == [1]
    assert counts[snake].unique().tolist() == [int(snake.sum())]


def test_fill_holes_fills_only_small_background_regions():
    scores = torch.full((1, 1, 9, 9), 5.0)
    scores[0, 0, 2:4, 2:4] = -3.0  # a 4-pixel hole: filled
    scores[0, 0, 5:8, 5:8] = -2.0  # a 9-pixel hole: kept
    scores[0, 0, 0, 8] = -1.0  # a 1-pixel background region on the border: also filled
    filled = fill_holes_in_mask_scores(scores, max_area=4)
    expected = scores.clone()
    expected[0, 0, 2:4, 2:4] = 0.1
    expected[0, 0, 0, 8] = 0.1
    assert torch.equal(filled, expected)
    with pytest.raises(ValueError, match="positive"):
        fill_holes_in_mask_scores(scores, max_area=0)


def test_mask_to_box_gives_inclusive_corners_and_marks_empty_masks():
    masks = torch.zeros(2, 1, 6, 8, dtype=torch.bool)
    masks[0, 0, 1:4, 2:7] = True
    boxes = mask_to_box(masks)
    assert boxes.shape == (2, 1, 4)
    assert boxes[0, 0].tolist() == [2, 1, 6, 3]
    assert boxes[1, 0].tolist() == [8, 6, -1, -1]


def test_concat_points_appends_new_clicks_after_old_ones():
    first = concat_points(None, torch.ones(1, 1, 2), torch.ones(1, 1, dtype=torch.int32))
    both = concat_points(first, torch.zeros(1, 2, 2), torch.zeros(1, 2, dtype=torch.int32))
    assert both["point_coords"].shape == (1, 3, 2) and both["point_labels"].tolist() == [[1, 0, 0]]


def _write_video(folder, num_frames=3, size=(20, 28)):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for index in (2, 10, 0)[:num_frames]:  # numeric, not lexicographic, order
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{index}.jpg")
    return [np.asarray(Image.open(folder / f"{index}.jpg").convert("RGB")) for index in sorted((2, 10, 0)[:num_frames])]


def test_video_frames_from_folder_and_memory_agree(tmp_path):
    decoded = _write_video(tmp_path / "clip")
    from_folder, height, width = load_video_frames(str(tmp_path / "clip"), 32, offload_video_to_cpu=True)
    from_list, h2, w2 = load_video_frames(decoded, 32, offload_video_to_cpu=True)
    from_array, _, _ = load_video_frames(np.stack(decoded), 32, offload_video_to_cpu=True)
    assert (height, width) == (h2, w2) == (20, 28)
    assert from_folder.shape == (3, 3, 32, 32) and from_folder.dtype == torch.float32
    assert torch.equal(from_folder, from_list) and torch.equal(from_folder, from_array)
    lazy, _, _ = load_video_frames(str(tmp_path / "clip"), 32, offload_video_to_cpu=True, async_loading_frames=True)
    lazy.thread.join()
    assert len(lazy) == 3 and all(torch.equal(lazy[i], from_folder[i]) for i in range(3))


def test_video_frames_errors_say_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no JPEG"):
        load_video_frames(str(tmp_path / "empty"), 32, True)
    with pytest.raises(NotImplementedError, match="ffmpeg"):
        load_video_frames(str(tmp_path / "video.mp4"), 32, True)
    with pytest.raises(ValueError, match="uint8"):
        load_video_frames([np.zeros((4, 4, 3), dtype=np.float32)], 32, True)


def test_postprocess_fills_holes_and_removes_sprinkles_at_low_res():
    logits = torch.full((1, 1, 8, 8), -4.0)
    logits[0, 0, 1:6, 1:6] = 4.0
    logits[0, 0, 3, 3] = -4.0  # 1-pixel hole inside the square
    logits[0, 0, 7, 7] = 4.0  # 1-pixel sprinkle
    cleaned = SAM2Transforms(32, 0.0, max_hole_area=2, max_sprinkle_area=2)._remove_small_regions(logits)
    assert cleaned[0, 0, 3, 3] == 10.0 and cleaned[0, 0, 7, 7] == -10.0
    unchanged = torch.ones_like(logits, dtype=torch.bool)
    unchanged[0, 0, 3, 3] = unchanged[0, 0, 7, 7] = False
    assert torch.equal(cleaned[unchanged], logits[unchanged])
    out = SAM2Transforms(32, 0.0, max_hole_area=2, max_sprinkle_area=2).postprocess_masks(logits, (12, 10))
    assert out.shape == (1, 1, 12, 10)


@pytest.fixture(scope="module")
def reference_utils(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames") / "clip"
    _write_video(folder)
    rng = np.random.default_rng(3)
    inputs = {
        "folder": str(folder),
        "image": rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
        "image2": rng.integers(0, 256, (64, 40, 3), dtype=np.uint8),
        "coords": torch.tensor([[[3.0, 7.0], [50.0, 30.5]]]),
        "boxes": torch.tensor([[1.0, 2.0, 40.0, 30.0], [0.0, 0.0, 53.0, 37.0]]),
        "low_res": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 3,
    }
    outputs = reference.run(
        """
        from PIL import Image
        from sam2.utils.misc import load_video_frames
        from sam2.utils.transforms import SAM2Transforms
        t = SAM2Transforms(resolution=64, mask_threshold=0.0)
        outputs["frames"] = load_video_frames(inputs["folder"], 48, True, compute_device=torch.device("cpu"))
        outputs["image"] = t(inputs["image"])
        outputs["pil"] = t(Image.fromarray(inputs["image"]))
        outputs["batch"] = t.forward_batch([inputs["image"], inputs["image2"]])
        outputs["coords"] = t.transform_coords(inputs["coords"], normalize=True, orig_hw=(37, 53))
        outputs["coords_relative"] = t.transform_coords(inputs["coords"] / 100)
        outputs["boxes"] = t.transform_boxes(inputs["boxes"], normalize=True, orig_hw=(37, 53))
        outputs["masks"] = t.postprocess_masks(inputs["low_res"], (37, 53))
        """,
        **inputs,
    )
    return inputs, outputs


@pytest.mark.reference
def test_frames_and_transforms_match_reference(reference_utils):
    inputs, ref = reference_utils
    frames, height, width = load_video_frames(inputs["folder"], 48, offload_video_to_cpu=True)
    assert_close((frames, height, width), ref["frames"], rtol=0, atol=0)
    t = SAM2Transforms(resolution=64, mask_threshold=0.0)
    assert_close(t(inputs["image"]), ref["image"])
    assert_close(t(Image.fromarray(inputs["image"])), ref["pil"])
    assert_close(t.forward_batch([inputs["image"], inputs["image2"]]), ref["batch"])
    assert_close(
        t.transform_coords(inputs["coords"], normalize=True, orig_hw=(37, 53)),
        ref["coords"],
    )
    assert_close(t.transform_coords(inputs["coords"] / 100), ref["coords_relative"])
    assert_close(
        t.transform_boxes(inputs["boxes"], normalize=True, orig_hw=(37, 53)),
        ref["boxes"],
    )
    assert_close(t.postprocess_masks(inputs["low_res"], (37, 53)), ref["masks"])
