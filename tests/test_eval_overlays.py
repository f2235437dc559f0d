"""Overlay pictures: layout, where prompts and masks are drawn, files and the TensorBoard grid."""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.evaluation.clicks import Click
from training.evaluation.overlays import (
    OBJECT_COLOURS,
    POSITIVE,
    OverlaySample,
    overlay_grid,
    render_sample,
    save_overlays,
)


def _sample(height: int = 200, width: int = 300) -> OverlaySample:
    image = np.full((height, width, 3), 100, np.uint8)
    gt = np.zeros((2, 1, height, width), bool)
    gt[:, 0, 50:100, 60:160] = True
    pred = np.zeros_like(gt)
    pred[1, 0, 10:20, 10:20] = True
    return OverlaySample(
        name="clip/a b", frames=[image, image], frame_indices=[0, 5], gt=gt, pred=pred,
        clicks=[[Click(110, 75, positive=True)]], boxes=[[60.0, 50.0, 159.0, 99.0]],
    )


def test_layout_prompt_ground_truth_prediction():
    picture = np.asarray(render_sample(_sample()))
    assert picture.shape == (400, 900, 3)  # 2 frames x (prompt | ground truth | prediction)
    assert tuple(picture[75, 110]) == POSITIVE  # the click, on the prompt panel
    blended = np.round(0.45 * 100 + 0.55 * OBJECT_COLOURS[0]).astype(np.uint8)
    assert tuple(picture[75, 300 + 110]) == tuple(blended)  # ground truth panel, object 1 colour
    assert tuple(picture[75, 600 + 110]) == (100, 100, 100)  # nothing predicted on frame 0
    assert tuple(picture[200 + 15, 600 + 15]) == tuple(blended)  # prediction on the second frame
    assert tuple(picture[200 + 75, 110]) == (100, 100, 100)  # prompts only on the first frame


def test_small_frames_are_enlarged_and_files_written(tmp_path):
    sample = _sample(height=40, width=50)
    sample.clicks = [[Click(20, 15, positive=False)]]
    picture = render_sample(sample)
    assert picture.size == (150 * 5, 80 * 5)
    paths = save_overlays([sample], tmp_path / "out", prefix="val_")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["val_000_clip_a_b.png"]
    with Image.open(paths[0]) as saved:
        assert saved.size == picture.size


def test_grid_scales_to_max_width_and_pads():
    grid = overlay_grid([_sample(), _sample(100, 100)], max_width=450)
    assert grid.shape[1] == 450 and grid.dtype == np.uint8
    # 900x400 halved to 450x200; 300x200 enlarged twice (frames under 192 px) to 600x400, then 450x300.
    assert grid.shape[0] == 200 + 300
