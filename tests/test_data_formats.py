"""COCO RLE decoding, SA-1B and SA-V (JSON masklet) datasets."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tests.data_factory import id_map, make_sa1b_dataset, make_sav_dataset
from training.dataset import transforms as T
from training.dataset.decoding import DatasetError, decode_rle, encode_rle
from training.dataset.vos_dataset import VOSDataset
from training.dataset.vos_raw_dataset import JSONRawDataset, SA1BRawDataset
from training.dataset.vos_sampler import RandomUniformSampler
from training.dataset.vos_segment_loader import LazySegments

SIZE = (24, 36)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# A 50x70 mask encoded by pycocotools (published with the COCOtoolsFORK decoder): a symmetric
# figure whose run lengths only add up to 50 * 70 when deltas and sign bits decode correctly.
COCO_EXAMPLE = (
    "0g05b08J4M2N2NA^O1`0OCO=0E090H080IO68DH;>@C>a0_O_O`0j0OWOF<:CM72I24NL43JM92FN;1ENKO72L0LO91J0MO92INO0NO1"
    "22OO0M031O000NO31OO11MO40N011MO41MO21L06OL021L06OL021L06OL021L060J040L060J040L060J040L060J040L060J040L060J"
    "040L060KO31L060KO31L06OL021L06OL021L06OL021MO41MO21MO40N100NO310O00M0310O00NO1220NO92IONO91KOMO72M0<1EO:2GN"
    "63KM34OLM73JF<;=1G_O_Ob0=AC`07EH=1IO71H090F0:1DO>1_O1b0>2N2N3L6H]O"
)


def test_decode_published_coco_rle():
    mask = decode_rle({"size": [50, 70], "counts": COCO_EXAMPLE})
    assert mask.shape == (50, 70) and mask.dtype == np.uint8 and int(mask.sum()) == 2346
    assert np.array_equal(mask, mask[:, ::-1])  # the figure is left-right symmetric
    assert encode_rle(mask)["counts"] == COCO_EXAMPLE


def test_rle_round_trip_and_uncompressed_counts():
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (1, 1), (16, 3)]:
        mask = (rng.random(shape) < 0.4).astype(np.uint8)
        assert np.array_equal(decode_rle(encode_rle(mask)), mask)
    column_major = {"size": [2, 3], "counts": [1, 2, 3]}  # 0 | 1 1 | 0 0 0, read down the columns
    assert decode_rle(column_major).tolist() == [[0, 1, 0], [1, 0, 0]]
    with pytest.raises(DatasetError, match="sum to"):
        decode_rle({"size": [2, 3], "counts": [1, 2]})


def test_sa1b_dataset_yields_all_masks_as_objects(tmp_path):
    paths = make_sa1b_dataset(tmp_path, num_images=2, size=SIZE, num_objects=3)
    raw = SA1BRawDataset(paths.img_folder, paths.gt_folder, num_frames=2)
    video, loader = raw.get_video(raw.video_names.index("sa_2"))
    assert video.video_id == 2 and len(video.frames) == 2
    segments = loader.load(0)
    assert isinstance(segments, LazySegments) and sorted(segments.keys()) == [0, 1, 2]
    expected = id_map(1, 0, SIZE, 3, [1, 2, 3])
    assert torch.equal(segments[1], torch.from_numpy((expected == 2).astype(np.uint8)))
    dataset = VOSDataset([T.ToTensorAPI()], True, raw, RandomUniformSampler(2, 2), multiplier=1)
    random.seed(0)
    clip = dataset[0]
    assert len(clip.frames) == 2 and len(clip.frames[0].objects) == 2


def test_sa1b_area_and_stability_filters(tmp_path):
    paths = make_sa1b_dataset(tmp_path, num_images=1, size=SIZE, num_objects=2)
    path = f"{paths.gt_folder}/sa_1.json"
    with open(path) as f:
        data = json.load(f)
    full = np.ones(SIZE, np.uint8)
    data["annotations"].append({"area": full.size, "segmentation": encode_rle(full), "uncertain_iou": 0.99})
    data["annotations"][0]["uncertain_iou"] = 0.5
    with open(path, "w") as f:
        json.dump(data, f)
    keep_all = SA1BRawDataset(paths.img_folder, paths.gt_folder).get_video(0)[1]
    assert len(keep_all.load(0)) == 3
    filtered = SA1BRawDataset(paths.img_folder, paths.gt_folder, mask_area_frac_thresh=0.9, uncertain_iou=0.8)
    segments = filtered.get_video(0)[1].load(0)
    assert len(segments) == 1 and segments[0].sum() == (id_map(0, 0, SIZE, 2, [1, 2]) == 2).sum()


def test_sav_json_dataset(tmp_path):
    paths = make_sav_dataset(tmp_path, num_videos=2, num_frames=4, size=SIZE, num_objects=2)
    raw = JSONRawDataset(paths.img_folder, paths.gt_folder)
    video, loader = raw.get_video(1)
    assert [f.frame_idx for f in video.frames] == [0, 1, 2, 3]
    segments = loader.load(3, obj_ids=[1])
    assert list(segments) == [1]
    assert torch.equal(segments[1].bool(), torch.from_numpy(id_map(1, 3, SIZE, 2, [1, 2]) == 2))
    assert loader.get_valid_obj_frames_ids() == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    dataset = VOSDataset([T.ToTensorAPI()], True, raw, RandomUniformSampler(3, 2), multiplier=1)
    random.seed(0)
    clip = dataset[1]
    for frame in clip.frames:
        for obj in frame.objects:
            expected = id_map(1, obj.frame_index, SIZE, 2, [1, 2]) == obj.object_id + 1
            assert torch.equal(obj.segment.bool(), torch.from_numpy(expected))
