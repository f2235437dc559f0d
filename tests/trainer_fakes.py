"""Tiny stand-ins for the model, loss and dataset, to test the training engine in seconds.

They speak the real interfaces: batches are `BatchedVideoDatapoint`s, the dataset has
`get_loader(epoch)` with a DistributedSampler, the loss returns `core_loss` plus parts. The model
draws from the global RNG (dropout), the data from a per-epoch sampler and random noise, so exact
resume is only possible if the engine restores both.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

from training.utils.data_utils import BatchedVideoDatapoint, BatchedVideoMetaData
from training.utils.distributed import all_reduce_sum, get_rank, get_world_size

IMAGE_SIZE = 8


class TinyModel(nn.Module):
    """Predicts a mask logit per pixel from the image: [T, B, 3, H, W] -> [T, B, H, W]."""

    def __init__(self, hidden: int = 4, dropout: float = 0.1, frozen_head: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, hidden, 3, padding=1)
        self.norm = nn.LayerNorm(IMAGE_SIZE)
        self.head = nn.Conv2d(hidden, 1, 1)
        self.dropout = nn.Dropout(dropout)
        if frozen_head:
            self.head.requires_grad_(False)

    def forward(self, batch: BatchedVideoDatapoint) -> Tensor:
        images = batch.img_batch.flatten(0, 1)
        features = self.dropout(torch.relu(self.norm(self.encoder(images))))
        return self.head(features).squeeze(1).unflatten(0, batch.img_batch.shape[:2])


class TinyLoss(nn.Module):
    """Summed squared error over the batch, divided by the global object count (as the SAM loss)."""

    def __init__(self, nan_on_calls: list[int] | None = None, nan_on_ranks: list[int] | None = None) -> None:
        super().__init__()
        self.nan_on_calls = set(nan_on_calls or [])  # 1-based call numbers whose loss is NaN
        self.nan_on_ranks = nan_on_ranks  # the ranks where they are (None: every rank)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        self.calls += 1
        num_objects = all_reduce_sum(torch.tensor(float(targets.shape[1])))
        num_objects = torch.clamp(num_objects / get_world_size(), min=1)
        squared = (outputs - targets.float()) ** 2
        loss_mse = squared.mean(dim=(0, 2, 3)).sum() / num_objects
        on_this_rank = self.nan_on_ranks is None or get_rank() in self.nan_on_ranks
        if self.nan_on_calls and on_this_rank and int(self.calls) in self.nan_on_calls:
            loss_mse = loss_mse * float("nan")
        return {"core_loss": loss_mse, "loss_mse": loss_mse.detach()}


class TinyVideoDataset(Dataset):
    """`num_videos` random one-frame clips with a thresholded-channel mask; fresh noise per read."""

    def __init__(self, num_videos: int, stall_file: str | None = None, stall_after: int = 0, noise: float = 0.01) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.images = torch.rand(num_videos, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        self.masks = self.images[:, 0] > 0.5
        self.stall_file, self.stall_after, self.noise = stall_file, stall_after, noise
        self.reads = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, Tensor, Tensor]:
        self.reads += 1
        # A test creates `stall_file` to freeze the run at a known point, to kill or preempt it there.
        if self.stall_file and self.reads > self.stall_after:
            while os.path.exists(self.stall_file):
                time.sleep(0.05)
        noise = self.noise * torch.randn(3, IMAGE_SIZE, IMAGE_SIZE)
        return index, self.images[index] + noise, self.masks[index]


def collate(items: list[tuple[int, Tensor, Tensor]], dict_key: str = "all") -> BatchedVideoDatapoint:
    ids = torch.tensor([i for i, _, _ in items])
    images = torch.stack([image for _, image, _ in items]).unsqueeze(0)  # [T=1, B, 3, H, W]
    masks = torch.stack([mask for _, _, mask in items]).unsqueeze(0)  # [T=1, O=B, H, W]
    num = len(items)
    identifiers = torch.stack([ids, torch.zeros(num, dtype=torch.long), torch.zeros(num, dtype=torch.long)], -1)
    return BatchedVideoDatapoint(
        img_batch=images,
        obj_to_frame_idx=torch.stack([torch.zeros(num), torch.arange(num)], -1).int().unsqueeze(0),
        masks=masks,
        metadata=BatchedVideoMetaData(
            unique_objects_identifier=identifiers.unsqueeze(0),
            frame_orig_size=torch.full((1, num, 2), IMAGE_SIZE, dtype=torch.long),
            batch_size=[1],
        ),
        dict_key=dict_key,
        batch_size=[1],
    )


class TinyTrainData:
    """The `trainer.data.train` object: `get_loader(epoch)` as in `TorchTrainMixedDataset`."""

    def __init__(
        self,
        num_videos: int = 8,
        batch_size: int = 2,
        shuffle: bool = True,
        stall_file: str | None = None,
        stall_after: int = 0,
        shard: bool = True,
        noise: float = 0.01,
    ) -> None:
        self.dataset = TinyVideoDataset(num_videos, stall_file, stall_after, noise)
        self.batch_size, self.shuffle, self.shard = batch_size, shuffle, shard

    def get_loader(self, epoch: int) -> DataLoader:
        if self.shard:
            sampler = DistributedSampler(self.dataset, shuffle=self.shuffle, seed=0)
            sampler.set_epoch(epoch)
        else:
            sampler = SequentialSampler(self.dataset)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate, drop_last=True)


def trainer_config(run_dir: str, **changes: Any) -> dict[str, Any]:
    """A complete `trainer:` section over the fakes (CPU, no AMP); `changes` replace top-level keys."""
    config: dict[str, Any] = {
        "_target_": "training.trainer.Trainer",
        "mode": "train_only",
        "max_epochs": 2,
        "accelerator": "cpu",
        "seed_value": 123,
        "model": {"_target_": "tests.trainer_fakes.TinyModel"},
        "data": {"train": {"_target_": "tests.trainer_fakes.TinyTrainData", "num_videos": 8, "batch_size": 2}},
        "loss": {"all": {"_target_": "tests.trainer_fakes.TinyLoss"}},
        "optim": {
            "amp": {"enabled": False, "amp_dtype": "bfloat16"},
            "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-2},
            "gradient_clip": {"_target_": "training.optimizer.GradientClipper", "max_norm": 1.0, "norm_type": 2},
        },
        "distributed": {"backend": "gloo", "find_unused_parameters": False},
        "logging": {
            "tensorboard_writer": {
                "_target_": "training.utils.logger.make_tensorboard_logger",
                "log_dir": f"{run_dir}/tensorboard",
                "flush_secs": 1,
                "should_log": True,
            },
            "log_dir": f"{run_dir}/logs",
            "log_freq": 1,
        },
        "checkpoint": {"save_dir": f"{run_dir}/checkpoints", "save_freq": 0},
    }
    config.update(changes)
    return config


def full_config(run_dir: str, **trainer_changes: Any) -> dict[str, Any]:
    """A whole training config (trainer, launcher, submitit) as train.py reads it."""
    return {
        "trainer": trainer_config(run_dir, **trainer_changes),
        "launcher": {"num_nodes": 1, "gpus_per_node": 1, "experiment_log_dir": run_dir},
        "submitit": {"use_cluster": False, "timeout_hour": 1, "cpus_per_task": 1, "port_range": [20000, 60000]},
    }
