"""Validation during training (`data.val`, `trainer.validation`): the real tiny SAM2Train trains
on synthetic images/videos while validation scores it, writes `checkpoint_best.pt`, keeps the
best score across a resume, stops early, and the run ends with a picture of predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.data_factory import make_image_dataset, make_video_dataset
from tests.sam2_train_setup import IMAGE_SIZE, LOSS, MODEL
from tests.test_trainer_engine import run_in_process
from tests.trainer_fakes import trainer_config
from training.engine.validation_hook import ValidationConf, ValidationHook
from training.utils.distributed import destroy_process_group

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

TRANSFORMS = [
    {
        "_target_": "training.dataset.transforms.ComposeAPI",
        "transforms": [
            {"_target_": "training.dataset.transforms.RandomResizeAPI", "sizes": IMAGE_SIZE, "square": True, "consistent_transform": True},
            {"_target_": "training.dataset.transforms.ToTensorAPI"},
            {"_target_": "training.dataset.transforms.NormalizeAPI", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        ],
    }
]


def loader_config(raw: dict, *, training: bool, num_frames: int, batch_size: int) -> dict:
    """A `TorchTrainMixedDataset` over one VOSDataset, as the training configs build them."""
    sampler = (
        {"_target_": "training.dataset.vos_sampler.RandomUniformSampler", "num_frames": num_frames, "max_num_objects": 2}
        if training
        else {"_target_": "training.dataset.vos_sampler.EvalSampler"}
    )
    return {
        "_target_": "training.dataset.sam2_datasets.TorchTrainMixedDataset",
        "datasets": [
            {
                "_target_": "training.dataset.vos_dataset.VOSDataset",
                "transforms": TRANSFORMS,
                "training": training,
                "video_dataset": raw,
                "sampler": sampler,
                "multiplier": 1,
            }
        ],
        "batch_sizes": [batch_size],
        "num_workers": 0,
        "shuffle": training,
        "pin_memory": False,
        "drop_last": training,
        "collate_fn": {"_target_": "training.utils.data_utils.collate_fn", "_partial_": True, "dict_key": "all" if training else "val"},
    }


def sam2_trainer_config(run_dir: Path, raw: dict, *, num_frames: int, **changes) -> dict:
    """The tiny SAM2Train (64 px) trained on `raw` and validated on the same clips."""
    model = {**MODEL, "num_frames_to_correct_for_train": 1, "num_init_cond_frames_for_train": 1}
    changes = {"mode": "train", **changes}
    return trainer_config(
        str(run_dir),
        model=model,
        data={
            "train": loader_config(raw, training=True, num_frames=num_frames, batch_size=1),
            "val": loader_config(raw, training=False, num_frames=num_frames, batch_size=2),
        },
        loss={"all": {"_target_": "training.loss_fns.MultiStepMultiMasksAndIous", **LOSS}},
        optim={"amp": {"enabled": False}, "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3}},
        # As in the training configs: a step with no correction clicks leaves some heads unused.
        distributed={"backend": "gloo", "find_unused_parameters": True},
        **changes,
    )


def validation_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "val_stats.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> dict:
    paths = make_image_dataset(tmp_path_factory.mktemp("images"), num_images=2, size=(48, 64), num_objects=2)
    return {"_target_": "training.dataset.vos_raw_dataset.ImageFolderRawDataset", "img_folder": paths.img_folder, "gt_folder": paths.gt_folder}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, image_data):
    """Two epochs on two images (batch 1): validation after each, 1-click mIoU picks the best."""
    run_dir = tmp_path_factory.mktemp("image_run")
    config = sam2_trainer_config(
        run_dir, image_data, num_frames=1, max_epochs=2,
        validation={"options": {"correction_clicks": 1, "max_clicks": 2}, "num_overlays": 1},
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        trainer = run_in_process(config, monkeypatch)
    return run_dir, config, trainer


def test_validation_scores_each_epoch_and_keeps_the_best_checkpoint(image_run):
    run_dir, _, trainer = image_run
    rounds = validation_lines(run_dir)
    assert [(r["epoch"], r["step"]) for r in rounds] == [(1, 2), (2, 4)]
    assert all(r["metric"] == "iou_1_click" and 0.0 <= r["score"] <= 1.0 and r["num_images"] == 2 for r in rounds)
    assert {"iou_box", "iou_2_clicks", "noc_85", "noc_90"} <= set(rounds[0])

    best_round = max(rounds, key=lambda r: r["score"])  # the first of equal scores wins: ties do not improve
    best = torch.load(run_dir / "checkpoints" / "checkpoint_best.pt", weights_only=True)
    latest = torch.load(run_dir / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert best["steps"]["train"] == best_round["step"]
    assert best["validation"]["best"] == pytest.approx(best_round["score"])
    assert latest["validation"] == {"metric": "iou_1_click", "best": best_round["score"], "best_step": best_round["step"],
                                    "bad_validations": 2 - rounds.index(best_round) - 1}
    # The best checkpoint is a complete model checkpoint, loadable as the latest one is.
    assert set(best["model"]) == set(latest["model"])
    assert trainer.validation.tracker.best == pytest.approx(best_round["score"])


def test_validation_is_logged_to_tensorboard_and_the_run_ends_with_a_picture(image_run):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = image_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"Val/iou_1_click", "Val/iou_box", "Val/best"} <= set(events.Tags()["scalars"])
    assert [s.step for s in events.Scalars("Val/iou_1_click")] == [2, 4]
    assert [image.step for image in events.Images("Val/overlays")] == [2, 4]
    picture = run_dir / "predictions.png"
    with Image.open(picture) as image:
        assert image.mode == "RGB" and image.width > 0 and image.height > 0
    log = (run_dir / "logs" / "log.txt").read_text()  # what rank 0 printed
    assert "validation at step 4 (epoch 2): iou_1_click" in log
    assert f"predictions  {picture}" in log and f"tensorboard --logdir {run_dir / 'tensorboard'}" in log
    assert f"best         {run_dir / 'checkpoints' / 'checkpoint_best.pt'}" in log


def test_resume_keeps_the_best_score(image_run, monkeypatch):
    run_dir, config, _ = image_run
    saved = torch.load(run_dir / "checkpoints" / "checkpoint.pt", weights_only=True)["validation"]
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    from training.utils.distributed import find_free_port

    monkeypatch.setenv("MASTER_PORT", str(find_free_port()))
    try:
        resumed = instantiate(OmegaConf.create({**config, "max_epochs": 3}), _recursive_=False)
        assert resumed.epoch == 2 and resumed.validation.state_dict() == saved
    finally:
        destroy_process_group()


def test_early_stopping_by_steps_on_videos(tmp_path):
    """Step validation on 3-frame videos (J&F); no later score beats the first by 10, so the
    run stops at the second validation, mid-epoch, with that step's checkpoint written."""
    paths = make_video_dataset(tmp_path / "videos", num_videos=3, num_frames=3, size=(48, 64), num_objects=1)
    raw = {"_target_": "training.dataset.vos_raw_dataset.PNGRawDataset", "img_folder": paths.img_folder, "gt_folder": paths.gt_folder}
    run_dir = tmp_path / "run"
    config = sam2_trainer_config(
        run_dir, raw, num_frames=2, max_epochs=3, val_epoch_freq=None,
        validation={"every_steps": 1, "patience": 1, "min_delta": 10.0, "num_overlays": 1},
    )
    with pytest.MonkeyPatch.context() as patch:
        trainer = run_in_process(config, patch)
    rounds = validation_lines(run_dir)
    assert [(r["metric"], r["step"], r["epoch"]) for r in rounds] == [("J&F", 1, 0.3333), ("J&F", 2, 0.6667)]
    assert rounds[0]["num_videos"] == 3 and 0.0 <= rounds[0]["score"] <= 1.0
    latest = torch.load(run_dir / "checkpoints" / "checkpoint.pt", weights_only=True)
    best = torch.load(run_dir / "checkpoints" / "checkpoint_best.pt", weights_only=True)
    assert (latest["epoch"], latest["batch_in_epoch"], latest["steps"]["train"]) == (0, 2, 2)
    assert best["steps"]["train"] == 1 and latest["validation"]["bad_validations"] == 1
    assert trainer.stopped_early and trainer.steps["train"] == 2


def test_validation_config_errors():
    with pytest.raises(ValueError, match="task"):
        ValidationConf(task="segmentation")
    with pytest.raises(ValueError, match="every_steps"):
        ValidationConf(every_steps=-1)
    assert ValidationConf(metric="noc_90").metric_mode == "min" and ValidationConf().metric_mode == "max"


def test_when_validation_is_due():
    hook = ValidationHook(ValidationConf(every_steps=5), dataset=None, rank=0, device=torch.device("cpu"), logger=None, log_dir=".")
    due = [e for e in range(1, 8) if hook.due_after_epoch(epochs_done=e, max_epochs=7, epoch_freq=3, step=e * 4)]
    assert due == [3, 5, 6, 7]  # every 3rd, the last, and epoch 5 whose last step (20) is a step validation
    assert [s for s in range(1, 12) if hook.due_after_step(s)] == [5, 10]
    hook.tracker.update(0.5, step=3)
    state = hook.state_dict()
    other = ValidationHook(ValidationConf(metric="J&F"), dataset=None, rank=0, device=torch.device("cpu"), logger=None, log_dir=".")
    other.load_state_dict({**state, "metric": "iou_1_click"})  # another metric: the best starts over
    assert other.tracker.best is None


def test_validation_over_two_ranks_gives_the_one_rank_numbers(tmp_path, monkeypatch):
    """`mode: val` on three images: two spawned gloo ranks (one padded item) score as one rank."""
    from tests.test_trainer_engine import train_cli, write_config

    paths = make_image_dataset(tmp_path / "images", num_images=3, size=(48, 64), num_objects=2)
    raw = {"_target_": "training.dataset.vos_raw_dataset.ImageFolderRawDataset", "img_folder": paths.img_folder, "gt_folder": paths.gt_folder}
    weights = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save({"model": instantiate(MODEL, _convert_="all").state_dict()}, weights)
    initializer = {
        "_partial_": True,
        "_target_": "training.utils.checkpoint_utils.load_state_dict_into_model",
        "strict": True,
        "state_dict": {
            "_target_": "training.utils.checkpoint_utils.load_checkpoint_and_apply_kernels",
            "checkpoint_path": str(weights),
            "ckpt_state_dict_keys": ["model"],
        },
    }

    def config_for(name: str) -> dict:
        run_dir = tmp_path / name
        trainer = sam2_trainer_config(run_dir, raw, num_frames=1, mode="val", max_epochs=1,
                                      validation={"options": {"correction_clicks": 1, "max_clicks": 2}})
        del trainer["data"]["train"]
        trainer["data"]["val"]["batch_sizes"] = [1]
        trainer["logging"]["final_predictions"] = 0
        trainer["checkpoint"]["model_weight_initializer"] = initializer
        return {"trainer": trainer, "launcher": {"num_nodes": 1, "gpus_per_node": 1, "experiment_log_dir": str(run_dir)},
                "submitit": {"use_cluster": False}}

    single = config_for("one")
    run_in_process(single["trainer"], monkeypatch)
    folder = tmp_path / "spawned_config"
    folder.mkdir()
    train_cli(write_config(folder, config_for("two")), "--cpu-processes", "2")
    (one,), (two,) = validation_lines(tmp_path / "one"), validation_lines(tmp_path / "two")
    assert one["num_images"] == two["num_images"] == 3 and one["num_objects"] == two["num_objects"] == 6
    assert one == pytest.approx(two, abs=1e-9)
