"""End to end on the real model: the README's quickstart command, and the official MOSE config.

Both run SAM 2.1 tiny at 64 px on CPU for a few steps through `training/train.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.data_factory import make_video_dataset
from training.export import check_prediction
from training.export import main as export_main
from training.tools.make_sample_data import make_sample_data

REPO = Path(__file__).resolve().parent.parent
MOSE = "configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml"
TINY_TRUNK = [
    "trainer.model.image_encoder.trunk.embed_dim=96",
    "trainer.model.image_encoder.trunk.num_heads=1",
    "+trainer.model.image_encoder.trunk.stages=[1,2,7,2]",
    "+trainer.model.image_encoder.trunk.global_att_blocks=[5,7,9]",
    "+trainer.model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[7,7]",
    "trainer.model.image_encoder.neck.backbone_channel_list=[768,384,192,96]",
]

pytestmark = pytest.mark.slow


def train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "training" / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def test_quickstart_trains_and_its_checkpoint_predicts(tmp_path):
    images, masks = make_sample_data(str(tmp_path / "data"), num_images=4, size=64)
    run_dir = tmp_path / "run"
    done = train(
        "-c", "sam2.1_training/quickstart", "--num-gpus", "0",
        f"launcher.experiment_log_dir={run_dir}", f"dataset.img_folder={images}", f"dataset.gt_folder={masks}",
        "scratch.resolution=64", "scratch.num_epochs=3",
    )
    assert "SAM 2 training" in done.stdout and "training finished" in done.stdout
    assert "dataset check: 2 dataset(s) usable" in done.stdout  # trained and validated on the samples

    # Validation after epochs 2 (val_epoch_freq) and 3 (the last); the better one is kept.
    rounds = [json.loads(line) for line in (run_dir / "logs" / "val_stats.json").read_text().splitlines()]
    assert [(r["epoch"], r["metric"]) for r in rounds] == [(2, "iou_1_click"), (3, "iou_1_click")]
    assert "validation at step 4 (epoch 2): iou_1_click" in done.stdout
    best = torch.load(run_dir / "checkpoints" / "checkpoint_best.pt", weights_only=True)
    assert best["validation"]["best"] == max(r["score"] for r in rounds)

    # The closing lines say where everything is, and the picture is there.
    picture = run_dir / "predictions.png"
    assert f"checkpoint   {run_dir / 'checkpoints' / 'checkpoint.pt'}" in done.stdout
    assert f"tensorboard  tensorboard --logdir {run_dir / 'tensorboard'}" in done.stdout
    assert f"predictions  {picture}" in done.stdout
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.height >= 2 * 192  # one row per sample

    epochs = [json.loads(line) for line in (run_dir / "logs" / "train_stats.json").read_text().splitlines()]
    assert len(epochs) == 3
    assert epochs[-1]["Losses/train_loss"] < epochs[0]["Losses/train_loss"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config_resolved.yaml").is_file()

    checkpoint = run_dir / "checkpoints" / "checkpoint.pt"
    weights = tmp_path / "model.pt"
    argv = [str(checkpoint), "--model-config", "sam2.1_hiera_t", "--output", str(weights), "--image-size", "64"]
    assert export_main(argv) == 0
    assert set(torch.load(weights, weights_only=True)) == {"model"}
    shape, _ = check_prediction("sam2.1_hiera_t", str(weights), image_size=64)
    assert shape == (1, 64, 64)


@pytest.mark.reference
def test_official_mose_config_runs_and_its_checkpoint_loads_in_the_reference(tmp_path, reference):
    from sam2.build_sam import build_sam2

    data = make_video_dataset(tmp_path / "mose", num_videos=1, num_frames=3, size=(64, 64))
    initial = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": build_sam2("sam2.1_hiera_t", device="cpu").state_dict()}, initial)
    # The official config exactly as published, taken from the reference package.
    config = reference.root / "sam2" / "configs" / "sam2.1_training" / "sam2.1_hiera_b+_MOSE_finetune.yaml"
    run_dir = tmp_path / "run"
    train(
        "-c", str(config), "--use-cluster", "0", "--num-gpus", "0",
        f"launcher.experiment_log_dir={run_dir}",
        f"dataset.img_folder={data.img_folder}", f"dataset.gt_folder={data.gt_folder}", "dataset.file_list_txt=null",
        f"trainer.checkpoint.model_weight_initializer.state_dict.checkpoint_path={initial}",
        "scratch.resolution=64", "scratch.num_frames=2", "scratch.num_train_workers=0", "scratch.num_epochs=1",
        *TINY_TRUNK,
    )
    state = torch.load(run_dir / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert state["steps"]["train"] == 2  # 1 video x multiplier 2, batch 1
    out = reference.run(
        """
        from sam2.build_sam import build_sam2
        model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", inputs["ckpt"], device="cpu")
        outputs["names"] = sorted(model.state_dict())
        """,
        ckpt=str(run_dir / "checkpoints" / "checkpoint.pt"),
    )
    assert out["names"] == sorted(state["model"])
