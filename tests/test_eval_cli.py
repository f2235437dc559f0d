"""The evaluator end to end (CSV, overlays, comparison of two checkpoints, both entry points) and
evaluation across two gloo ranks giving the numbers of one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from tests.data_factory import make_image_dataset, make_video_dataset
from tests.eval_setup import tiny_eval_model, write_tiny_model_files
from training.dataset.vos_raw_dataset import PNGRawDataset
from training.evaluate import main
from training.evaluation.report import compare_results, read_csv
from training.evaluation.video_eval import evaluate_video_dataset

REPO = Path(__file__).resolve().parents[1]
SIZE = (40, 56)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_tiny_model_files(tmp_path_factory.mktemp("model"), seeds=(0, 1))


@pytest.fixture(scope="module")
def video_paths(tmp_path_factory):
    return make_video_dataset(tmp_path_factory.mktemp("videos"), num_videos=3, num_frames=4, size=SIZE, num_objects=2)


def test_two_checkpoints_side_by_side(model_files, video_paths, tmp_path, capsys):
    config, (base, tuned) = model_files
    out = tmp_path / "eval"
    args = ["--model-config", config, "--checkpoint", base, "--checkpoint", tuned, "--name", "base", "--name", "tuned"]
    args += ["--img-folder", video_paths.img_folder, "--gt-folder", video_paths.gt_folder, "--device", "cpu"]
    results = main(args + ["--output-dir", str(out), "--num-overlays", "2", "--prompt", "box"])
    printed = capsys.readouterr().out
    assert "base" in printed and "tuned" in printed and "difference" in printed and "J&F" in printed

    table = read_csv(out / "base.csv")
    assert sorted(table["level"].unique()) == ["object", "overall", "video"]
    assert (table["level"] == "object").sum() == 6 and (table["level"] == "video").sum() == 3
    overall = table[table["level"] == "overall"].iloc[0]
    assert overall["J&F"] == pytest.approx(results["base"].summary["J&F"])
    objects = table[table["level"] == "object"]
    assert overall["J"] == pytest.approx(objects["J"].mean())

    comparison = pd.read_csv(out / "comparison.csv", index_col="metric")
    assert list(comparison.columns) == ["base", "tuned", "difference"]
    assert comparison.loc["J&F", "difference"] == pytest.approx(
        results["tuned"].summary["J&F"] - results["base"].summary["J&F"]
    )
    assert compare_results(results).loc["J", "base"] == pytest.approx(results["base"].summary["J"])
    # Different weights, different numbers: the comparison is not of a run with itself.
    assert not results["base"].objects["J"].equals(results["tuned"].objects["J"])

    overlays = sorted((out / "overlays" / "tuned").glob("*.png"))
    assert [p.name for p in overlays] == ["000_video000.png", "001_video001.png"]
    with Image.open(overlays[0]) as picture:
        # 3 rows (first, middle, last frame) of 3 panels, enlarged by a whole factor.
        assert picture.width * SIZE[0] == picture.height * SIZE[1] and picture.width % (3 * SIZE[1]) == 0
        assert np.asarray(picture.convert("RGB")).std() > 0


def test_script_entry_point_on_images(model_files, tmp_path):
    config, (base, _) = model_files
    paths = make_image_dataset(tmp_path / "images", num_images=2, size=SIZE, num_objects=2)
    out = tmp_path / "eval"
    command = [sys.executable, "training/evaluate.py", "--model-config", config, "--checkpoint", base]
    command += ["--img-folder", paths.img_folder, "--gt-folder", paths.gt_folder, "--output-dir", str(out)]
    command += ["--correction-clicks", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iou_1_click" in done.stdout and "noc_90" in done.stdout
    table = read_csv(out / "tiny_seed0.csv")
    assert (table["level"] == "image").sum() == 2 and (table["level"] == "object").sum() == 4
    assert {"iou_box", "iou_1_click", "iou_3_clicks", "noc_85", "noc_90"} <= set(table.columns)
    assert len(list((out / "overlays" / "tiny_seed0").glob("*.png"))) == 2


def test_module_entry_point_and_errors():
    done = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "--checkpoint" in done.stdout
    with pytest.raises(FileNotFoundError, match="--img-folder"):
        main(["--model-config", "sam2.1_hiera_t", "--checkpoint", "x.pt", "--img-folder", "/nonexistent",
              "--gt-folder", "/x"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, world_size: int, port: int, img_folder: str, gt_folder: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        dataset = PNGRawDataset(img_folder, gt_folder)
        result = evaluate_video_dataset(tiny_eval_model(), dataset, prompt="mask")
        if rank == 0:
            result.objects.to_csv(out_file, index=False)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_numbers_of_one(video_paths, tmp_path):
    single = evaluate_video_dataset(tiny_eval_model(), PNGRawDataset(video_paths.img_folder, video_paths.gt_folder))
    out_file = str(tmp_path / "rank0.csv")
    mp.spawn(
        _rank_worker,
        args=(2, _free_port(), video_paths.img_folder, video_paths.gt_folder, out_file),
        nprocs=2,
        join=True,
    )
    gathered = pd.read_csv(out_file)
    expected = single.objects.reset_index(drop=True)
    assert list(gathered["video"]) == list(expected["video"]) == ["video000"] * 2 + ["video001"] * 2 + ["video002"] * 2
    for column in ("J", "F", "J&F"):
        np.testing.assert_allclose(gathered[column].to_numpy(), expected[column].to_numpy(), rtol=0, atol=1e-12)


def test_a_training_config_is_scored_on_its_validation_folders(tmp_path):
    config = tmp_path / "with_val.yaml"
    config.write_text(
        "# @package _global_\ndefaults:\n  - sam2.1_training/quickstart\n  - _self_\n"
        f"dataset:\n  val_img_folder: {tmp_path / 'val_images'}\n  val_gt_folder: {tmp_path / 'val_masks'}\n"
    )
    with pytest.raises(FileNotFoundError, match="val_images"):  # not the training images of quickstart
        main(["-c", str(config), "--checkpoint", "none", "--output-dir", str(tmp_path / "out")])
