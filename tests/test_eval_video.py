"""Video evaluation: tracking with track_step gives the video predictor's masks, scoring and
aggregation follow DAVIS, training batches evaluate like raw videos."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data_factory import make_video_dataset
from tests.eval_setup import batch_from_clips, tiny_eval_model
from training.dataset.vos_raw_dataset import PNGRawDataset
from training.evaluation.clicks import first_click, mask_box
from training.evaluation.results import summarize_video_rows
from training.evaluation.samples import EvalClip, clips_from_batch, read_raw_video
from training.evaluation.video_eval import (
    evaluate_video_clips,
    evaluate_video_dataset,
    score_clip,
    scored_frames,
    track_clip,
)

SIZE = (40, 56)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    paths = make_video_dataset(tmp_path_factory.mktemp("videos"), num_videos=3, num_frames=5, size=SIZE, num_objects=2)
    return PNGRawDataset(paths.img_folder, paths.gt_folder)


@pytest.fixture(scope="module")
def predictor():
    return tiny_eval_model(target="sam2.sam2_video_predictor.SAM2VideoPredictor")


def _predictor_masks(predictor, clip: EvalClip, prompt: str) -> np.ndarray:
    state = predictor.init_state(clip.frames)
    for o, obj_id in enumerate(clip.object_ids):
        gt = clip.gt_masks[0, o]
        if prompt == "mask":
            predictor.add_new_mask(state, 0, obj_id, gt)
        elif prompt == "box":
            predictor.add_new_points_or_box(state, 0, obj_id, box=mask_box(gt))
        else:
            click = first_click(gt)
            predictor.add_new_points_or_box(state, 0, obj_id, points=[[click.x, click.y]], labels=[1])
    out = np.zeros((clip.num_frames, len(clip.object_ids), *clip.size), dtype=bool)
    for t, obj_ids, masks in predictor.propagate_in_video(state):
        assert list(obj_ids) == clip.object_ids
        out[t] = (masks[:, 0] > 0).cpu().numpy()
    return out


@pytest.mark.parametrize("prompt", ["mask", "box", "click"])
def test_track_clip_matches_video_predictor(dataset, predictor, prompt):
    clip = read_raw_video(dataset, 1)
    ours = track_clip(predictor, clip, prompt=prompt)
    expected = _predictor_masks(predictor, clip, prompt)
    assert ours.shape == (5, 2, *SIZE)
    assert ours[1:].any(), "degenerate test: nothing tracked"
    np.testing.assert_array_equal(ours, expected)


def test_read_raw_video_gives_full_resolution_frames_and_masks(dataset):
    clip = read_raw_video(dataset, 0, max_frames=3)
    assert clip.name == "video000" and clip.object_ids == [1, 2]
    assert len(clip.frames) == 3 and clip.frames[0].shape == (*SIZE, 3) and clip.frames[0].dtype == np.uint8
    assert clip.gt_masks.shape == (3, 2, *SIZE) and clip.gt_masks.dtype == bool
    assert clip.gt_masks[:, 0].sum(axis=(1, 2)).min() > 0


def test_scored_frames_follow_davis():
    assert scored_frames(5) == [1, 2, 3]
    assert scored_frames(5, skip_first_and_last=False) == [1, 2, 3, 4]
    assert scored_frames(2) == [1] and scored_frames(1) == [0]


def test_score_clip_perfect_and_empty_predictions(dataset):
    clip = read_raw_video(dataset, 0)
    perfect = score_clip(clip, clip.gt_masks)
    assert [r["object_id"] for r in perfect] == [1, 2]
    for row in perfect:
        assert row["J"] == row["F"] == row["J&F"] == row["J_recall"] == 1.0 and row["num_frames"] == 3
        assert row["J_decay"] == 0.0
    empty = score_clip(clip, np.zeros_like(clip.gt_masks))
    assert all(r["J"] == r["F"] == r["J&F"] == 0.0 for r in empty)


def test_summary_is_mean_over_objects_and_drops_duplicates():
    rows = [
        {"video": "a", "object_id": 1, "J": 1.0, "F": 0.5},
        {"video": "a", "object_id": 2, "J": 0.0, "F": 0.5},
        {"video": "b", "object_id": 1, "J": 0.5, "F": 1.0},
        {"video": "b", "object_id": 1, "J": 0.5, "F": 1.0},  # padding duplicate from a sampler
    ]
    for row in rows:
        row.update({"J&F": (row["J"] + row["F"]) / 2, "J_recall": 0, "F_recall": 0, "J_decay": 0, "F_decay": 0})
    objects, videos, summary = summarize_video_rows(rows)
    assert len(objects) == 3 and summary["num_objects"] == 3 and summary["num_videos"] == 2
    assert summary["J"] == pytest.approx(0.5) and summary["F"] == pytest.approx(2 / 3)
    assert summary["J&F"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert videos.set_index("video").loc["a", "J&F"] == pytest.approx(0.5)
    assert videos.set_index("video").loc["a", "num_objects"] == 2


def test_evaluate_video_dataset_is_deterministic_and_restores_mode(dataset):
    model = tiny_eval_model().train()
    first = evaluate_video_dataset(model, dataset, prompt="click", keep_predictions=1)
    assert model.training
    second = evaluate_video_dataset(model, dataset, prompt="click")
    assert first.objects.equals(second.objects)
    assert first.summary["num_videos"] == 3 and first.summary["num_objects"] == 6
    assert 0.0 <= first.score <= 1.0 and first.primary_metric == "J&F"
    sample = first.samples[0]
    assert sample.frame_indices == [0, 2, 4] and sample.pred.shape == (3, 2, *SIZE)
    assert len(sample.clicks) == 2 and sample.clicks[0][0] == first_click(sample.gt[0, 0])


def test_training_batches_evaluate_like_resized_raw_videos(dataset):
    model = tiny_eval_model()
    raw = [read_raw_video(dataset, i) for i in range(2)]
    clips = clips_from_batch(batch_from_clips(raw, model.image_size))
    assert [c.name for c in clips] == ["video0", "video1"] and clips[1].object_ids == [1, 2]
    assert clips[0].gt_masks.shape == (5, 2, model.image_size, model.image_size)
    from_batch = evaluate_video_clips(model, clips, prompt="mask")
    # The same frames and masks, resized by hand to the model's size, as raw clips.
    resized = [
        EvalClip(c.name, [clip.rgb_frame(t) for t in range(clip.num_frames)], clip.gt_masks, clip.object_ids)
        for c, clip in zip(raw, clips)
    ]
    from_frames = evaluate_video_clips(model, resized, prompt="mask")
    assert from_batch.summary["num_objects"] == 4
    assert from_batch.summary["J&F"] == pytest.approx(from_frames.summary["J&F"], abs=0.02)


def test_sam2train_tracks_like_sam2base_with_the_same_weights(dataset):
    # During training validation the model is a SAM2Train, whose track_step has extra outputs
    # (per-step lists) instead of some of SAM2Base's; the masks must not depend on that.
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.predictor_setup import tiny_model_config

    base = tiny_eval_model(seed=4)
    train_model = instantiate(OmegaConf.create(tiny_model_config("training.model.sam2.SAM2Train")), _recursive_=True)
    train_model.load_state_dict(base.state_dict(), strict=True)
    clip = read_raw_video(dataset, 2)
    for prompt in ("mask", "click"):
        expected = track_clip(base, clip, prompt=prompt)
        np.testing.assert_array_equal(track_clip(train_model.eval(), clip, prompt=prompt), expected)


def test_clip_without_objects_gives_no_rows(dataset):
    clip = read_raw_video(dataset, 0, max_frames=2)
    empty = EvalClip("empty", clip.frames, clip.gt_masks[:, :0], [])
    result = evaluate_video_clips(tiny_eval_model(), [empty, clip])
    assert result.summary["num_videos"] == 1 and list(result.objects["video"].unique()) == ["video000"]
