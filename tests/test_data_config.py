"""The official MOSE fine-tune config's data section instantiates on our code, unchanged but for paths."""

from __future__ import annotations

import random

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.data_factory import make_image_dataset, make_video_dataset
from tests.reference import ensure_reference
from training.utils.data_utils import BatchedVideoDatapoint

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
CONFIG = "sam2/configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml"


@pytest.fixture(scope="module")
def mose_config(reference):
    return OmegaConf.load(ensure_reference() / CONFIG)


def test_official_mose_data_section_builds_and_yields_batches(mose_config, tmp_path):
    paths = make_video_dataset(tmp_path, num_videos=2, num_frames=4, size=(40, 56), num_objects=3)
    cfg = mose_config.copy()
    cfg.dataset.img_folder, cfg.dataset.gt_folder, cfg.dataset.file_list_txt = paths.img_folder, paths.gt_folder, None
    cfg.scratch.resolution, cfg.scratch.num_frames, cfg.scratch.num_train_workers = 64, 3, 0
    cfg.trainer.data.train.pin_memory = False
    train = instantiate(cfg.trainer.data.train)  # as the official trainer does
    random.seed(0)
    torch.manual_seed(0)
    batches = list(train.get_loader(epoch=0))
    assert len(batches) == 4  # 2 videos x multiplier 2, batch size 1
    batch = batches[0]
    assert isinstance(batch, BatchedVideoDatapoint) and batch.dict_key == "all"
    assert batch.img_batch.shape == (3, 1, 3, 64, 64) and batch.masks.shape[2:] == (64, 64)
    assert 1 <= batch.masks.shape[1] <= 3 and batch.masks.dtype == torch.bool


def test_image_folder_dataset_drops_into_the_same_config(mose_config, tmp_path):
    paths = make_image_dataset(tmp_path, num_images=3, size=(40, 56), num_objects=2)
    cfg = mose_config.copy()
    cfg.scratch.resolution, cfg.scratch.num_frames, cfg.scratch.num_train_workers = 64, 1, 0
    cfg.trainer.data.train.pin_memory = False
    cfg.trainer.data.train.datasets[0].dataset.datasets[0].video_dataset = {
        "_target_": "training.dataset.vos_raw_dataset.ImageFolderRawDataset",
        "img_folder": paths.img_folder, "gt_folder": paths.gt_folder,
    }
    train = instantiate(cfg.trainer.data.train, _convert_="all")
    batches = list(train.get_loader(epoch=0))
    assert len(batches) == 6 and batches[0].img_batch.shape == (1, 1, 3, 64, 64)
