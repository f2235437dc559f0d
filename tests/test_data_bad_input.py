"""Broken datasets: each problem gives a clear error (or a counted skip) and shows up in the checker."""

from __future__ import annotations

import logging
import os
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.data_factory import make_image_dataset, make_video_dataset
from training.dataset import transforms as T
from training.dataset.checks import (
    DatasetCheckFailed,
    check_config_datasets,
    check_dataset,
)
from training.dataset.decoding import DatasetError
from training.dataset.vos_dataset import VOSDataset
from training.dataset.vos_raw_dataset import ImageFolderRawDataset, PNGRawDataset
from training.dataset.vos_sampler import RandomUniformSampler
from training.tools.check_dataset import main as check_main
from training.tools.make_sample_data import make_sample_data

SIZE = (24, 32)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def videos(tmp_path, **kw):
    return make_video_dataset(tmp_path, **{"num_videos": 2, "num_frames": 5, "size": SIZE, "num_objects": 2, **kw})


def dataset(paths, *, num_frames=5, strict=False, training=True, **raw_kw) -> VOSDataset:
    return VOSDataset([T.ToTensorAPI()], training, PNGRawDataset(paths.img_folder, paths.gt_folder, **raw_kw),
                      RandomUniformSampler(num_frames, 2), multiplier=1, strict=strict, max_retries=5)


def kinds(report) -> set[str]:
    return {p.kind for p in report.problems}


def test_empty_image_folder(tmp_path):
    (tmp_path / "frames").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match="no videos found"):
        PNGRawDataset(str(tmp_path / "frames"), str(tmp_path / "masks"))
    with pytest.raises(DatasetError, match="no images found"):
        ImageFolderRawDataset(str(tmp_path / "frames"), str(tmp_path / "masks"))
    assert "empty dataset" in kinds(check_dataset(str(tmp_path / "frames"), str(tmp_path / "masks")))


def test_missing_gt_folder(tmp_path):
    paths = videos(tmp_path)
    with pytest.raises(DatasetError, match="gt_folder"):
        PNGRawDataset(paths.img_folder, str(tmp_path / "nope"))
    assert "missing folder" in kinds(check_dataset(paths.img_folder, str(tmp_path / "nope")))


def test_corrupt_jpeg_mid_video_is_skipped_and_counted(tmp_path, caplog):
    paths = videos(tmp_path, num_videos=1)
    bad = os.path.join(paths.img_folder, "video000", "00002.jpg")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    data = dataset(paths, num_frames=2)
    random.seed(0)
    with caplog.at_level(logging.WARNING):
        clips = [data[0] for _ in range(12)]
    assert data.num_skipped_frames == 1 and data.corrupt_frames == {bad}
    assert "skipped corrupt frame" in caplog.text and "00002.jpg" in caplog.text
    assert all(2 not in [o.frame_index for f in c.frames for o in f.objects] for c in clips)
    with pytest.raises(DatasetError, match="00002.jpg"):
        strict = dataset(paths, num_frames=5, strict=True)
        strict[0]
    report = check_dataset(paths.img_folder, paths.gt_folder)
    assert [p.path for p in report.errors] == [bad] and "corrupt frame" in kinds(report)


def test_mask_of_different_size_than_frame(tmp_path):
    paths = videos(tmp_path, num_videos=1)
    for t in range(5):
        path = os.path.join(paths.gt_folder, "video000", f"{t:05d}.png")
        Image.open(path).resize((16, 16), Image.NEAREST).save(path)
    with pytest.raises(DatasetError, match=r"mask of object .* is \(16, 16\) but frame .* is \(24, 32\)"):
        dataset(paths, training=False)[0]
    assert "size mismatch" in kinds(check_dataset(paths.img_folder, paths.gt_folder))


def test_video_with_no_annotated_frames(tmp_path, caplog):
    paths = videos(tmp_path)
    for name in os.listdir(os.path.join(paths.gt_folder, "video001")):
        os.remove(os.path.join(paths.gt_folder, "video001", name))
    with pytest.raises(DatasetError, match="video001 has no annotated frames"):
        PNGRawDataset(paths.img_folder, paths.gt_folder).get_video(1)
    random.seed(0)
    with caplog.at_level(logging.WARNING):
        clip = dataset(paths)[1]  # training draws another video instead
    assert clip.video_id == 0 and "no annotated frames" in caplog.text
    assert "no annotated frames" in kinds(check_dataset(paths.img_folder, paths.gt_folder))


def test_file_list_naming_missing_videos(tmp_path):
    paths = videos(tmp_path)
    (tmp_path / "list.txt").write_text("video000\nvideo007\nvideo009\n")
    with pytest.raises(DatasetError, match=r"2 of the 3 videos .*video007"):
        PNGRawDataset(paths.img_folder, paths.gt_folder, file_list_txt=str(tmp_path / "list.txt"))
    report = check_dataset(paths.img_folder, paths.gt_folder, file_list_txt=str(tmp_path / "list.txt"))
    assert len([p for p in report.errors if p.kind == "listed video missing"]) == 2


def test_masks_with_no_objects_fail_fast_with_a_clear_error(tmp_path):
    paths = videos(tmp_path, num_videos=1, object_ids=[0, 0])
    data = dataset(paths, num_frames=2, training=False)
    with pytest.raises(DatasetError, match="no object is visible .* 4 distinct clips"):
        data[0]
    report = check_dataset(paths.img_folder, paths.gt_folder)
    assert "no objects" in kinds(report) and report.num_empty_masks == 5


def test_rgb_masks_that_are_not_palettised(tmp_path):
    paths = videos(tmp_path, num_videos=1, mask_format="rgb")
    with pytest.raises(DatasetError, match="colour RGB image, not a palettised"):
        PNGRawDataset(paths.img_folder, paths.gt_folder).get_video(0)[1].load(0)
    assert "colour RGB mask" in kinds(check_dataset(paths.img_folder, paths.gt_folder))


def test_palette_vs_per_object_confusion(tmp_path):
    paths = videos(tmp_path, num_videos=1, layout="per_object")
    report = check_dataset(paths.img_folder, paths.gt_folder)
    assert "layout confusion" in kinds(report) and "is_palette=False" in str(report.errors[0])
    assert check_dataset(paths.img_folder, paths.gt_folder, is_palette=False).ok


def test_image_folder_problems_are_listed(tmp_path):
    paths = make_image_dataset(tmp_path, num_images=4, size=SIZE)
    os.remove(os.path.join(paths.gt_folder, "img001.png"))
    shutil.copy(os.path.join(paths.gt_folder, "img000.png"), os.path.join(paths.gt_folder, "orphan.png"))
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(os.path.join(paths.gt_folder, "img002.png"))
    with pytest.raises(DatasetError, match=r"1 images .* have no mask .*img001.jpg"):
        ImageFolderRawDataset(paths.img_folder, paths.gt_folder)
    report = check_dataset(paths.img_folder, paths.gt_folder)
    assert report.layout == "images"
    assert {"image without mask", "mask without image", "size mismatch", "empty mask"} <= kinds(report)


def test_non_jpeg_frames_are_flagged_but_usable(tmp_path):
    paths = videos(tmp_path, num_videos=1, image_ext=".png")
    report = check_dataset(paths.img_folder, paths.gt_folder)
    assert report.ok and "non-JPEG frames" in kinds(report)
    assert len(PNGRawDataset(paths.img_folder, paths.gt_folder).get_video(0)[0].frames) == 5


def test_checker_counts_and_cli_exit_codes(tmp_path, capsys):
    paths = videos(tmp_path)
    report = check_dataset(paths.img_folder, paths.gt_folder)
    assert report.ok and report.num_videos == 2 and report.num_frames == 10 and report.num_masks == 10
    assert report.objects_per_frame == {2: 10} and report.frame_sizes == {SIZE: 10}
    assert check_main(["--img-folder", paths.img_folder, "--gt-folder", paths.gt_folder]) == 0
    assert "videos: 2, frames: 10" in capsys.readouterr().out
    os.remove(os.path.join(paths.img_folder, "video000", "00001.jpg"))
    with open(os.path.join(paths.img_folder, "video000", "00003.jpg"), "wb") as f:
        f.write(b"\xff\xd8garbage")
    assert check_main(["--img-folder", paths.img_folder, "--gt-folder", paths.gt_folder]) == 1
    out = capsys.readouterr().out
    assert "corrupt frame" in out and "00003.jpg" in out and "FAILED" in out


def test_checker_cli_reads_a_training_config_with_overrides(tmp_path, capsys):
    images, masks = make_sample_data(str(tmp_path / "data"), num_images=2, size=32)
    config = ["--config", "sam2.1_training/quickstart", "--fast"]
    assert check_main([*config, f"dataset.img_folder={images}", f"dataset.gt_folder={masks}"]) == 0
    assert "OK: the data can train" in capsys.readouterr().out
    assert check_main([*config, f"dataset.img_folder={tmp_path / 'nowhere'}", f"dataset.gt_folder={masks}"]) == 1
    assert "nowhere" in capsys.readouterr().out
    assert check_main(["--config", "no_such_config"]) == 2
    assert "no_such_config" in capsys.readouterr().err


def test_config_check_stops_on_unusable_data(tmp_path):
    paths = videos(tmp_path)
    config = {"train": {"datasets": [{"dataset": {"datasets": [{"video_dataset": {
        "_target_": "training.dataset.vos_raw_dataset.PNGRawDataset",
        "img_folder": paths.img_folder, "gt_folder": paths.gt_folder, "file_list_txt": None}}]}}]}}
    assert len(check_config_datasets(config)) == 1
    config["train"]["datasets"][0]["dataset"]["datasets"][0]["video_dataset"]["gt_folder"] = str(tmp_path / "x")
    with pytest.raises(DatasetCheckFailed, match="gt_folder does not exist"):
        check_config_datasets(config)
