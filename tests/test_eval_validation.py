"""Metrics inside the training loop: batches from the real validation pipeline, TensorBoard
scalars and overlay panel, best-checkpoint tracking and early stopping."""

from __future__ import annotations

import math

import pytest

from sam2.utils.video_frames import IMAGENET_MEAN, IMAGENET_STD
from tests.data_factory import make_image_dataset, make_video_dataset
from tests.eval_setup import tiny_eval_model
from training.dataset import transforms as T
from training.dataset.vos_dataset import VOSDataset
from training.dataset.vos_raw_dataset import ImageFolderRawDataset, PNGRawDataset
from training.dataset.vos_sampler import EvalSampler
from training.evaluation.samples import clips_from_batch
from training.evaluation.validation import BestCheckpointTracker, ValidationMetrics, log_validation
from training.evaluation.video_eval import evaluate_video_clips
from training.utils.data_utils import collate_fn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def val_batches(raw, image_size: int, batch_size: int) -> list:
    """Batches as the trainer's `data.val` makes them: square resize, normalise, every frame."""
    transforms = [
        T.ComposeAPI(
            [
                T.RandomResizeAPI(sizes=image_size, consistent_transform=True, square=True),
                T.ToTensorAPI(),
                T.NormalizeAPI(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ]
        )
    ]
    dataset = VOSDataset(transforms, False, raw, EvalSampler(), multiplier=1)
    items = [dataset[i] for i in range(len(dataset))]
    return [collate_fn(items[i : i + batch_size], dict_key="val") for i in range(0, len(items), batch_size)]


@pytest.fixture(scope="module")
def model():
    return tiny_eval_model(seed=2)


@pytest.fixture(scope="module")
def video_batches(tmp_path_factory, model):
    paths = make_video_dataset(tmp_path_factory.mktemp("v"), num_videos=3, num_frames=4, size=(40, 56), num_objects=2)
    return val_batches(PNGRawDataset(paths.img_folder, paths.gt_folder), model.image_size, batch_size=2)


def test_video_metrics_over_pipeline_batches(model, video_batches):
    # Image-only options in a shared config (task "auto") must not reach the video evaluation.
    metrics = ValidationMetrics(task="video", prompt="mask", num_overlays=1, correction_clicks=2, max_clicks=5)
    model.train()
    for batch in video_batches:
        metrics.update(model, batch)
    assert model.training
    result = metrics.compute()
    assert result.summary["num_videos"] == 3 and result.summary["num_objects"] == 6
    assert list(result.objects["video"]) == ["video0", "video0", "video1", "video1", "video2", "video2"]
    # Batching does not change the numbers: the same clips evaluated one by one agree.
    clips = [clip for batch in video_batches for clip in clips_from_batch(batch)]
    direct = evaluate_video_clips(model, clips, prompt="mask")
    assert result.score == pytest.approx(direct.score, abs=1e-12)
    assert len(result.samples) == 1
    metrics.reset()
    assert metrics.rows == [] and metrics.samples == []


def test_image_metrics_over_pipeline_batches(tmp_path, model):
    paths = make_image_dataset(tmp_path, num_images=2, size=(40, 56), num_objects=2)
    batches = val_batches(ImageFolderRawDataset(paths.img_folder, paths.gt_folder), model.image_size, batch_size=2)
    metrics = ValidationMetrics(task="image", correction_clicks=1, max_clicks=3)
    for batch in batches:
        metrics.update(model, batch)
    result = metrics.compute()
    assert result.summary["num_images"] == 2 and result.summary["num_objects"] == 4
    assert result.primary_metric == "iou_1_click" and 0.0 <= result.score <= 1.0
    assert {"iou_box", "iou_2_clicks", "noc_85", "noc_90"} <= set(result.summary)


def test_tensorboard_scalars_and_overlay_panel(tmp_path, model, video_batches):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    metrics = ValidationMetrics(task="video", prompt="box", num_overlays=2)
    metrics.update(model, video_batches[0])
    result = metrics.compute()
    writer = SummaryWriter(str(tmp_path))
    written = log_validation(writer, result, step=3)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"Val/J&F", "Val/J", "Val/F"} <= set(events.Tags()["scalars"])
    (jf,) = events.Scalars("Val/J&F")
    assert jf.step == 3 and jf.value == pytest.approx(written["Val/J&F"]) == pytest.approx(result.score)
    (panel,) = events.Images("Val/overlays")
    assert panel.step == 3 and panel.width > 0 and panel.height > 0


def test_best_checkpoint_tracker_and_early_stopping():
    tracker = BestCheckpointTracker(patience=2)
    assert [tracker.update(v, step=i) for i, v in enumerate([0.5, 0.6, 0.6, 0.55])] == [True, True, False, False]
    assert tracker.best == 0.6 and tracker.best_step == 1 and tracker.should_stop
    restored = BestCheckpointTracker(patience=2)
    restored.load_state_dict(tracker.state_dict())
    assert restored.should_stop and restored.update(0.7) and not restored.should_stop

    lower = BestCheckpointTracker(mode="min", min_delta=0.5)
    assert lower.update(10.0) and not lower.update(9.8) and lower.update(9.0)
    assert not lower.update(math.nan) and not BestCheckpointTracker().should_stop
    with pytest.raises(ValueError, match="patience"):
        BestCheckpointTracker(patience=0)


def test_unknown_task_or_prompt_is_rejected():
    with pytest.raises(ValueError, match="task"):
        ValidationMetrics(task="segmentation")
    with pytest.raises(ValueError, match="prompt"):
        ValidationMetrics(prompt="scribble")
    with pytest.raises(ValueError, match=r"unknown validation option\(s\) \['max_click'\]"):
        ValidationMetrics(task="image", max_click=3)
