"""Training loaders over several datasets, each with its own batch size, split across ranks."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Subset
from torch.utils.data.distributed import DistributedSampler

from training.dataset.utils import set_dataset_epoch

logger = logging.getLogger(__name__)


def world_size_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group, or (1, 0) outside distributed runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class MixedDataLoader:
    """Interleaves batches of several loaders, picking a loader at random at each step.

    The pick uses a generator reseeded with the same `seed` on every rank at each iter(), so all
    ranks take a batch from the same dataset at the same step. An exhausted loader drops out of the draw.
    """

    def __init__(self, dataloaders: list[DataLoader], mixing_prob: torch.Tensor, seed: int = 42) -> None:
        if len(dataloaders) != mixing_prob.shape[0]:
            raise ValueError(f"{len(dataloaders)} dataloaders but {mixing_prob.shape[0]} mixing probabilities")
        self.dataloaders = dataloaders
        self.mixing_prob = mixing_prob
        self.seed = seed
        self._iter_dls: list[Iterator] | None = None
        self._iter_mixing_prob: torch.Tensor | None = None
        self.random_generator = torch.Generator()

    def __len__(self) -> int:
        return sum(len(d) for d in self.dataloaders)

    def __iter__(self) -> MixedDataLoader:
        self.random_generator.manual_seed(self.seed)
        self._iter_dls = [iter(loader) for loader in self.dataloaders]
        self._iter_mixing_prob = self.mixing_prob.clone()
        return self

    def __next__(self):
        if self._iter_dls is None:
            raise TypeError(f"{type(self).__name__} object is not an iterator; call iter() first")
        while self._iter_mixing_prob.any():
            choice = int(self._iter_mixing_prob.multinomial(1, generator=self.random_generator).item())
            try:
                return next(self._iter_dls[choice])
            except StopIteration:
                self._iter_mixing_prob[choice] = 0
        raise StopIteration


class TorchTrainMixedDataset:
    """Builds, per epoch, one DataLoader per dataset (each sharded over ranks) and mixes them.

    With phases_per_epoch > 1 a pass over a dataset is cut into that many random chunks, one
    per (shorter) trainer epoch. dataset_prob defaults to each dataset's share of batches.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        batch_sizes: Sequence[int],
        num_workers: int,
        shuffle: bool,
        pin_memory: bool,
        drop_last: bool,
        collate_fn: Callable | None = None,
        worker_init_fn: Callable | None = None,
        phases_per_epoch: int = 1,
        dataset_prob: Sequence[float] | None = None,
    ) -> None:
        self.datasets = list(datasets)
        self.batch_sizes = list(batch_sizes)
        if not self.datasets or len(self.datasets) != len(self.batch_sizes):
            raise ValueError(
                f"need one batch size per dataset, got {len(self.datasets)} datasets and {len(self.batch_sizes)} batch sizes"
            )
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.collate_fn = collate_fn
        self.worker_init_fn = worker_init_fn
        self.phases_per_epoch = phases_per_epoch
        for dataset in self.datasets:
            if isinstance(dataset, IterableDataset):
                raise TypeError(f"iterable datasets are not supported, got {type(dataset).__name__}")
            set_dataset_epoch(dataset, 0)  # RepeatFactorWrapper knows its length only after this
        self.chunks: list[tuple | None] = [None] * len(self.datasets)
        self.dataset_prob = self._mixing_probabilities(dataset_prob)
        logger.info("dataset mixing probabilities: %s", self.dataset_prob.tolist())

    def _mixing_probabilities(self, dataset_prob: Sequence[float] | None) -> torch.Tensor:
        if dataset_prob is None:
            round_fn = math.floor if self.drop_last else math.ceil
            lengths = [round_fn(len(d) / bs) for d, bs in zip(self.datasets, self.batch_sizes)]
            if sum(lengths) == 0:
                raise ValueError(
                    f"no dataset yields a full batch: sizes {[len(d) for d in self.datasets]}, batch sizes "
                    f"{self.batch_sizes}, drop_last={self.drop_last}; lower the batch size or add data"
                )
            return torch.tensor([n / sum(lengths) for n in lengths])
        if len(dataset_prob) != len(self.datasets):
            raise ValueError(f"dataset_prob has {len(dataset_prob)} entries for {len(self.datasets)} datasets")
        prob = torch.tensor(list(dataset_prob), dtype=torch.float64)
        if abs(prob.sum().item() - 1.0) > 1e-6:
            raise ValueError(f"dataset_prob must sum to 1, got {list(dataset_prob)} (sum {prob.sum().item()})")
        return prob.float()

    def _epoch_dataset(self, d_idx: int, epoch: int) -> Dataset:
        dataset = self.datasets[d_idx]
        if self.phases_per_epoch <= 1:
            set_dataset_epoch(dataset, epoch)
            return dataset
        data_epoch, phase = divmod(epoch, self.phases_per_epoch)
        # Recut at the start of a data epoch, or when resuming mid-way with no chunks yet.
        if phase == 0 or self.chunks[d_idx] is None:
            set_dataset_epoch(dataset, data_epoch)
            generator = torch.Generator()
            generator.manual_seed(data_epoch)
            order = torch.randperm(len(dataset), generator=generator)
            self.chunks[d_idx] = torch.chunk(order, self.phases_per_epoch)
        return Subset(dataset, self.chunks[d_idx][phase])

    def get_loader(self, epoch: int, *, world_size: int | None = None, rank: int | None = None) -> MixedDataLoader:
        """This rank's loader for `epoch`; world size and rank default to the process group's."""
        if world_size is None or rank is None:
            world_size, rank = world_size_and_rank()
        loaders = []
        for d_idx, batch_size in enumerate(self.batch_sizes):
            dataset = self._epoch_dataset(d_idx, epoch)
            if len(dataset) == 0:
                raise ValueError(f"dataset {d_idx} is empty at epoch {epoch}; check its data and multiplier")
            per_rank = math.ceil(len(dataset) / world_size)
            if self.drop_last and per_rank < batch_size:
                raise ValueError(
                    f"dataset {d_idx} has {len(dataset)} clips this epoch: {per_rank} per rank over {world_size} "
                    f"ranks, fewer than batch size {batch_size}, so drop_last leaves no batch; lower the batch "
                    "size or raise the dataset multiplier"
                )
            # Pads by repeating items so every rank gets the same number of batches.
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=self.shuffle)
            sampler.set_epoch(epoch)
            loaders.append(
                DataLoader(
                    dataset,
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    batch_sampler=BatchSampler(sampler, batch_size, drop_last=self.drop_last),
                    collate_fn=self.collate_fn,
                    worker_init_fn=self.worker_init_fn,
                )
            )
        return MixedDataLoader(loaders, self.dataset_prob)
