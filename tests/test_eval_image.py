"""Image evaluation: box / click prompts reach the predictor as intended, the click loop and
NoC follow their definitions, results are deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from sam2.sam2_image_predictor import SAM2ImagePredictor
from tests.data_factory import make_image_dataset
from tests.eval_setup import tiny_eval_model
from training.dataset.vos_raw_dataset import ImageFolderRawDataset
from training.evaluation.clicks import clicks_to_reach, correction_click, first_click
from training.evaluation.image_eval import click_session, evaluate_image_dataset, evaluate_image_object
from training.evaluation.metrics import mask_iou
from training.evaluation.samples import read_raw_video

SIZE = (48, 60)


@pytest.fixture(scope="module")
def model():
    return tiny_eval_model(seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    paths = make_image_dataset(tmp_path_factory.mktemp("images"), num_images=3, size=SIZE, num_objects=2)
    return ImageFolderRawDataset(paths.img_folder, paths.gt_folder)


@pytest.fixture(scope="module")
def predictor_on_first_image(model, dataset):
    clip = read_raw_video(dataset, 0)
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(clip.frames[0])
    return predictor, clip


def test_click_session_replays_the_simulated_clicks(predictor_on_first_image):
    predictor, clip = predictor_on_first_image
    gt = clip.gt_masks[0, 1]
    ious, clicks, first_prediction = click_session(predictor, gt, max_clicks=5)
    assert len(ious) == 5 and len(clicks) == 5
    # Replay by hand: best-of-3 on the first click, then one mask fed with the last logits.
    masks, scores, low_res = predictor.predict(point_coords=[[clicks[0].x, clicks[0].y]], point_labels=[1])
    best = int(np.argmax(scores))
    assert clicks[0] == first_click(gt)
    np.testing.assert_array_equal(first_prediction, masks[best] > 0)
    assert ious[0] == pytest.approx(mask_iou(gt, masks[best] > 0))
    prediction, logits = masks[best] > 0, low_res[best][None]
    for n in range(1, 5):
        assert clicks[n] == correction_click(gt, prediction)
        masks, _, low_res = predictor.predict(
            point_coords=[[c.x, c.y] for c in clicks[: n + 1]],
            point_labels=[c.label for c in clicks[: n + 1]],
            mask_input=logits,
            multimask_output=False,
        )
        prediction, logits = masks[0] > 0, low_res[0][None]
        assert ious[n] == pytest.approx(mask_iou(gt, prediction))


def test_click_session_stops_early_only_after_min_clicks(predictor_on_first_image):
    predictor, clip = predictor_on_first_image
    gt = clip.gt_masks[0, 0]
    ious, _, _ = click_session(predictor, gt, max_clicks=20, stop_at_iou=0.0, min_clicks=3)
    assert len(ious) == 3


def test_evaluate_image_object_row(predictor_on_first_image):
    predictor, clip = predictor_on_first_image
    gt = clip.gt_masks[0, 0]
    row, drawn = evaluate_image_object(predictor, gt, correction_clicks=2, max_clicks=6)
    assert set(row) == {"iou_box", "iou_1_click", "iou_3_clicks", "noc_85", "noc_90"}
    ys, xs = np.nonzero(gt)
    assert drawn["box"] == [xs.min(), ys.min(), xs.max(), ys.max()]
    box_masks, _, _ = predictor.predict(box=drawn["box"], multimask_output=False)
    assert row["iou_box"] == pytest.approx(mask_iou(gt, box_masks[0] > 0))
    ious, _, _ = click_session(predictor, gt, max_clicks=6)
    assert row["iou_1_click"] == pytest.approx(ious[0]) and row["iou_3_clicks"] == pytest.approx(ious[2])
    assert row["noc_85"] == clicks_to_reach(ious, 0.85, max_clicks=6) <= 6
    assert row["noc_90"] == clicks_to_reach(ious, 0.90, max_clicks=6) >= row["noc_85"]


def test_evaluate_image_dataset_rows_summary_and_determinism(model, dataset):
    result = evaluate_image_dataset(model, dataset, correction_clicks=2, max_clicks=4, keep_predictions=2)
    again = evaluate_image_dataset(model, dataset, correction_clicks=2, max_clicks=4)
    assert result.objects.equals(again.objects)
    assert list(result.objects["image"]) == ["img000", "img000", "img001", "img001", "img002", "img002"]
    assert result.summary["num_images"] == 3 and result.summary["num_objects"] == 6
    assert result.primary_metric == "iou_1_click"
    assert result.score == pytest.approx(result.objects["iou_1_click"].mean())
    assert result.summary["noc_90"] == pytest.approx(result.objects["noc_90"].mean())
    assert len(result.items) == 3 and (result.items["num_objects"] == 2).all()
    assert len(result.samples) == 2 and result.samples[0].pred.shape == (2, 2, *SIZE)
