"""Raw datasets, segment loaders, sampler, VOSDataset, collate_fn and the mixed loader on tiny synthetic data."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data_factory import id_map, make_image_dataset, make_video_dataset
from training.dataset import transforms as T
from training.dataset.decoding import read_image
from training.dataset.sam2_datasets import TorchTrainMixedDataset
from training.dataset.utils import ConcatDataset, RepeatFactorWrapper
from training.dataset.vos_dataset import VOSDataset
from training.dataset.vos_raw_dataset import ImageFolderRawDataset, PNGRawDataset
from training.dataset.vos_sampler import EvalSampler, RandomUniformSampler
from training.utils.data_utils import BatchedVideoDatapoint, collate_fn

SIZE = (32, 48)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_video_dataset(tmp_path_factory.mktemp("v"), num_videos=3, num_frames=6, size=SIZE, num_objects=3)


def to_tensor_only() -> list:
    return [T.ComposeAPI([T.ToTensorAPI()])]


def test_png_raw_dataset_lists_videos_and_frames(videos):
    raw = PNGRawDataset(videos.img_folder, videos.gt_folder)
    assert raw.video_names == videos.names
    video, loader = raw.get_video(1)
    assert [f.frame_idx for f in video.frames] == list(range(6))
    assert video.video_name == "video001" and video.video_id == 1
    masks = loader.load(4)
    expected = id_map(1, 4, SIZE, 3, [1, 2, 3])
    assert list(masks) == [1, 2, 3]
    for obj_id, mask in masks.items():
        assert torch.equal(mask, torch.from_numpy(expected == obj_id))


def test_png_raw_dataset_options(videos, tmp_path):
    (tmp_path / "list.txt").write_text("video002\nvideo000.mp4\n\n")
    (tmp_path / "excluded.txt").write_text("video000\n")
    raw = PNGRawDataset(videos.img_folder, videos.gt_folder, file_list_txt=str(tmp_path / "list.txt"),
                        excluded_videos_list_txt=str(tmp_path / "excluded.txt"), sample_rate=2, truncate_video=5)
    assert raw.video_names == ["video002"]
    assert [f.frame_idx for f in raw.get_video(0)[0].frames] == [0, 2, 4]
    mult = PNGRawDataset(videos.img_folder, videos.gt_folder, frames_sampling_mult=True)
    assert len(mult) == 3 * 6


def test_per_object_layout_and_single_object_mode(tmp_path):
    paths = make_video_dataset(tmp_path, num_videos=1, num_frames=3, size=SIZE, num_objects=2, layout="per_object")
    raw = PNGRawDataset(paths.img_folder, paths.gt_folder, is_palette=False)
    _, loader = raw.get_video(0)
    masks = loader.load(2)
    expected = id_map(0, 2, SIZE, 2, [1, 2])
    assert list(masks) == [1, 2]  # folder k is object k + 1
    assert all(torch.equal(masks[k], torch.from_numpy(expected == k)) for k in (1, 2))
    single = PNGRawDataset(paths.img_folder, paths.gt_folder, is_palette=False, single_object_mode=True)
    assert single.video_names == ["video000/0", "video000/1"]
    video, loader = single.get_video(1)
    assert len(video.frames) == 3 and list(loader.load(0)) == [2]


def test_vos_dataset_clip_has_exact_frames_and_masks(videos):
    dataset = VOSDataset(to_tensor_only(), True, PNGRawDataset(videos.img_folder, videos.gt_folder),
                         RandomUniformSampler(num_frames=3, max_num_objects=2), multiplier=1)
    random.seed(0)
    clip = dataset[2]
    assert clip.video_id == 2 and clip.size == SIZE
    frame_ids = [f.objects[0].frame_index for f in clip.frames]
    assert frame_ids == list(range(frame_ids[0], frame_ids[0] + 3))
    object_ids = [o.object_id for o in clip.frames[0].objects]
    assert len(object_ids) == 2 and set(object_ids) <= {1, 2, 3}
    for frame, t in zip(clip.frames, frame_ids):
        pil = np.array(Image.open(f"{videos.img_folder}/video002/{t:05d}.jpg").convert("RGB"))
        assert torch.equal(frame.data, torch.from_numpy(pil).permute(2, 0, 1).float() / 255)
        expected = id_map(2, t, SIZE, 3, [1, 2, 3])
        for obj in frame.objects:
            assert obj.segment.dtype == torch.uint8
            assert torch.equal(obj.segment.bool(), torch.from_numpy(expected == obj.object_id))


def test_sampler_picks_only_objects_visible_on_first_frame(tmp_path):
    paths = make_video_dataset(tmp_path, num_videos=1, num_frames=4, size=SIZE, num_objects=2)
    # Object 2 appears from frame 2 on.
    for t in (0, 1):
        ids = id_map(0, t, SIZE, 2, [1, 0])
        Image.fromarray(ids.astype(np.uint8), mode="P").save(f"{paths.gt_folder}/video000/{t:05d}.png")
    raw = PNGRawDataset(paths.img_folder, paths.gt_folder)
    sampler = RandomUniformSampler(num_frames=2, max_num_objects=5, reverse_time_prob=0.5)
    seen = set()
    for seed in range(30):
        random.seed(seed)
        sample = sampler.sample(*raw.get_video(0))
        first = sample.frames[0].frame_idx
        assert sorted(sample.object_ids) == ([1] if first < 2 else [1, 2])
        assert abs(sample.frames[1].frame_idx - first) == 1
        seen.add((first, sample.frames[1].frame_idx > first))
    assert {(0, True), (3, False)} <= seen  # both directions happen


def test_eval_sampler_takes_every_frame_and_object(videos):
    video, loader = PNGRawDataset(videos.img_folder, videos.gt_folder).get_video(0)
    video.frames = video.frames[::-1]
    sample = EvalSampler().sample(video, loader)
    assert [f.frame_idx for f in sample.frames] == list(range(6))
    assert sorted(sample.object_ids) == [1, 2, 3]


def test_collate_builds_time_major_batch(videos):
    dataset = VOSDataset(to_tensor_only(), True, PNGRawDataset(videos.img_folder, videos.gt_folder),
                         RandomUniformSampler(num_frames=2, max_num_objects=3), multiplier=1)
    random.seed(1)
    clips = [dataset[0], dataset[1]]
    batch = collate_fn(clips, dict_key="all")
    assert isinstance(batch, BatchedVideoDatapoint) and batch.dict_key == "all"
    assert batch.img_batch.shape == (2, 2, 3, *SIZE) and batch.masks.shape == (2, 6, *SIZE)
    assert batch.masks.dtype == torch.bool and batch.num_frames == 2 and batch.num_videos == 2
    assert batch.obj_to_frame_idx[1].tolist() == [[1, 0]] * 3 + [[1, 1]] * 3
    ids = batch.metadata.unique_objects_identifier
    assert ids[0, :, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert ids[0, :3, 1].tolist() == [o.object_id for o in clips[0].frames[0].objects]
    assert batch.metadata.frame_orig_size[0, 0].tolist() == list(SIZE)
    assert torch.equal(batch.flat_img_batch[3], clips[1].frames[1].data)
    flat = batch.flat_obj_to_img_idx
    assert torch.equal(batch.flat_img_batch[flat[1, 4]], batch.img_batch[1, 1])
    moved = batch.to("cpu")
    assert moved.img_batch.shape == batch.img_batch.shape and moved.metadata.frame_orig_size.shape == (2, 6, 2)


def test_image_folder_dataset_trains_like_a_video_dataset(tmp_path):
    paths = make_image_dataset(tmp_path, num_images=3, size=SIZE, num_objects=2, image_ext=".png")
    raw = ImageFolderRawDataset(paths.img_folder, paths.gt_folder, num_frames=2)
    assert raw.video_names == paths.names
    dataset = VOSDataset(to_tensor_only(), True, raw, RandomUniformSampler(2, 3), multiplier=1)
    clip = dataset[1]
    image = torch.from_numpy(np.array(Image.open(f"{paths.img_folder}/img001.png"))).permute(2, 0, 1)
    assert all(torch.equal(f.data, image.float() / 255) for f in clip.frames)
    expected = id_map(1, 0, SIZE, 2, [1, 2])
    assert sorted(o.object_id for o in clip.frames[1].objects) == [1, 2]
    for obj in clip.frames[1].objects:
        assert torch.equal(obj.segment.bool(), torch.from_numpy(expected == obj.object_id))


@pytest.mark.parametrize("mask_format, ids", [("L", [1, 2]), ("I;16", [1, 2]), ("binary", [255]), ("palette", [1, 2])])
def test_image_folder_mask_formats(tmp_path, mask_format, ids):
    paths = make_image_dataset(tmp_path, num_images=1, size=SIZE, num_objects=2, mask_format=mask_format)
    _, loader = ImageFolderRawDataset(paths.img_folder, paths.gt_folder).get_video(0)
    assert sorted(loader.load(0)) == ids


def test_sixteen_bit_masks_carry_ids_above_255(tmp_path):
    paths = make_video_dataset(tmp_path, num_videos=1, num_frames=2, size=SIZE, num_objects=2,
                               object_ids=[300, 7], mask_format="I;16")
    masks = PNGRawDataset(paths.img_folder, paths.gt_folder).get_video(0)[1].load(1)
    expected = id_map(0, 1, SIZE, 2, [300, 7])
    assert list(masks) == [300, 7]
    assert torch.equal(masks[300], torch.from_numpy(expected == 300))


def test_read_image_matches_pil(videos):
    path = f"{videos.img_folder}/video000/00003.jpg"
    pil = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(read_image(path), pil)


class _Indexed(torch.utils.data.Dataset):
    """Items are their own indices, with unit repeat factors."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.repeat_factors = torch.ones(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> int:
        return int(idx)


def _indices(loader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_mixed_dataset_shards_every_item_across_ranks(world_size):
    mixed = TorchTrainMixedDataset([_Indexed(11)], batch_sizes=[2], num_workers=0, shuffle=True,
                                   pin_memory=False, drop_last=False, collate_fn=torch.tensor)
    per_rank = [_indices(mixed.get_loader(3, world_size=world_size, rank=r)) for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # same step count on every rank
    items = [i for batches in per_rank for batch in batches for i in batch]
    assert set(items) == set(range(11)) and len(items) == world_size * -(-11 // world_size)


def test_mixed_dataset_phases_cover_the_data_once_per_data_epoch():
    mixed = TorchTrainMixedDataset([_Indexed(10)], batch_sizes=[1], num_workers=0, shuffle=False,
                                   pin_memory=False, drop_last=False, collate_fn=torch.tensor, phases_per_epoch=3)
    seen = [i for epoch in range(3) for batch in _indices(mixed.get_loader(epoch)) for i in batch]
    assert sorted(seen) == list(range(10))


def test_mixed_dataset_rejects_too_small_shards_and_bad_probabilities():
    mixed = TorchTrainMixedDataset([_Indexed(5)], batch_sizes=[2], num_workers=0, shuffle=True,
                                   pin_memory=False, drop_last=True, collate_fn=torch.tensor)
    with pytest.raises(ValueError, match="fewer than batch size 2"):
        mixed.get_loader(0, world_size=5, rank=0)
    with pytest.raises(ValueError, match="sum to 1"):
        TorchTrainMixedDataset([_Indexed(5), _Indexed(3)], [1, 1], 0, True, False, True, dataset_prob=[0.5, 0.6])


def test_mixed_dataset_interleaves_datasets_with_their_batch_sizes():
    mixed = TorchTrainMixedDataset([_Indexed(6), RepeatFactorWrapper(ConcatDataset([_Indexed(2), _Indexed(2)]))],
                                   batch_sizes=[3, 1], num_workers=0, shuffle=False, pin_memory=False,
                                   drop_last=True, collate_fn=torch.tensor)
    batches = _indices(mixed.get_loader(0))
    assert sorted(len(b) for b in batches) == [1, 1, 1, 1, 3, 3]
    assert abs(mixed.dataset_prob[0].item() - 2 / 6) < 1e-6


def test_repeat_factor_wrapper_repeats_by_factor():
    base = _Indexed(4)
    base.repeat_factors = torch.tensor([1.0, 2.0, 0.0, 1.5])
    wrapper = RepeatFactorWrapper(base)
    with pytest.raises(RuntimeError, match="set_epoch"):
        len(wrapper)
    counts = torch.zeros(4)
    for epoch in range(200):
        wrapper.set_epoch(epoch)
        counts += torch.bincount(wrapper.epoch_ids, minlength=4)
    assert counts[:3].tolist() == [200, 400, 0] and 250 < counts[3] < 350


def test_dataloader_with_workers_yields_batches(videos):
    dataset = VOSDataset(to_tensor_only(), True, PNGRawDataset(videos.img_folder, videos.gt_folder),
                         RandomUniformSampler(num_frames=2, max_num_objects=2), multiplier=1)
    mixed = TorchTrainMixedDataset([dataset], batch_sizes=[2], num_workers=2, shuffle=True, pin_memory=False,
                                   drop_last=True, collate_fn=lambda b: collate_fn(b, "all"))
    batches = list(mixed.get_loader(0))
    assert len(batches) == 1 and batches[0].img_batch.shape == (2, 2, 3, *SIZE)
