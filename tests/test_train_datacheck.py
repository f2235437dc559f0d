"""train.py checks the datasets before any process or model exists and stops on data that cannot
train: one readable report on stderr, exit code 2, no traceback, nothing written to the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training.tools.make_sample_data import make_sample_data
from training.train import main

REPO = Path(__file__).resolve().parent.parent


def quickstart_argv(images: Path | str, masks: Path | str, run_dir: Path) -> list[str]:
    return [
        "-c", "sam2.1_training/quickstart", "--num-gpus", "0",
        f"dataset.img_folder={images}", f"dataset.gt_folder={masks}", f"launcher.experiment_log_dir={run_dir}",
    ]


def test_masks_without_images_stop_the_real_command(tmp_path):
    images, masks = make_sample_data(str(tmp_path / "data"), num_images=2, size=32)
    for name in os.listdir(images):
        os.remove(os.path.join(images, name))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "training/train.py", *quickstart_argv(images, masks, run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.startswith("error: the training data cannot be used:")
    assert "no images or videos found" in done.stderr
    assert f"[warning] mask without image: {os.path.join(masks, 'sample_000.png')}" in done.stderr
    assert "python -m training.tools.check_dataset" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not run_dir.exists()  # stopped before the run directory and any process


def test_a_mask_of_another_size_is_reported_with_its_file(tmp_path, capsys):
    images, masks = make_sample_data(str(tmp_path / "data"), num_images=2, size=32)
    wrong = os.path.join(masks, "sample_001.png")
    Image.fromarray(np.zeros((20, 20), np.uint8), mode="L").save(wrong)
    code = main(quickstart_argv(images, masks, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2
    assert f"[error] size mismatch: {wrong}: mask is 20x20" in err
    assert err.count("\n") < 30  # one report per dataset, not a stack trace


def test_an_empty_or_missing_folder_is_refused(tmp_path, capsys):
    images, masks = make_sample_data(str(tmp_path / "data"), num_images=2, size=32)
    shutil.rmtree(masks)
    os.makedirs(masks)
    code = main(quickstart_argv(images, masks, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and "image without mask" in err and "Traceback" not in err

    (tmp_path / "empty").mkdir()
    code = main(quickstart_argv(tmp_path / "empty", masks, tmp_path / "run"))
    assert code == 2 and "no images or videos found" in capsys.readouterr().err

    code = main(quickstart_argv(images, tmp_path / "nowhere", tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and f"dataset.gt_folder is '{tmp_path / 'nowhere'}', which does not exist" in err


def test_usable_data_is_reported_and_training_goes_on(tmp_path, capsys):
    from training.engine.config import compose_config, resolve_config
    from training.train import check_datasets

    images, masks = make_sample_data(str(tmp_path / "data"), num_images=2, size=32)
    overrides = [f"dataset.img_folder={images}", f"dataset.gt_folder={masks}", f"launcher.experiment_log_dir={tmp_path}"]
    cfg, path = compose_config("sam2.1_training/quickstart", overrides)
    # The quickstart trains and validates on the sample folder: both datasets are checked.
    assert check_datasets(resolve_config(cfg, path)) == "dataset check: 2 dataset(s) usable"


def test_a_batch_larger_than_the_dataset_is_one_line_not_a_traceback(tmp_path):
    images, masks = make_sample_data(str(tmp_path / "data"), num_images=2, size=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    argv = [*quickstart_argv(images, masks, tmp_path / "run"), "scratch.train_batch_size=4", "scratch.resolution=64"]
    done = subprocess.run(
        [sys.executable, "training/train.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error: cannot build the trainer: no dataset yields a full batch: sizes [2], batch sizes [4]" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
