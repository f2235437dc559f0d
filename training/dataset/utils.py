"""Dataset wrappers that carry per-item repeat factors: concatenation, subsets, repeat-factor sampling."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset as TorchConcatDataset
from torch.utils.data import Dataset
from torch.utils.data import Subset as TorchSubset


def set_dataset_epoch(dataset, epoch: int) -> None:
    """Tell a dataset (and anything it wraps that listens) which epoch starts."""
    if hasattr(dataset, "epoch"):
        dataset.epoch = epoch
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


class ConcatDataset(TorchConcatDataset):
    """Datasets one after another; `repeat_factors` is the concatenation of theirs."""

    def __init__(self, datasets: Iterable[Dataset]) -> None:
        super().__init__(datasets)
        missing = [type(d).__name__ for d in self.datasets if not hasattr(d, "repeat_factors")]
        if missing:
            raise TypeError(f"ConcatDataset needs datasets with repeat_factors (e.g. VOSDataset), got {missing}")
        self.repeat_factors = torch.cat([d.repeat_factors for d in self.datasets])

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            set_dataset_epoch(dataset, epoch)


class Subset(TorchSubset):
    """A subset that keeps the repeat factors of its items."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, indices)
        self.repeat_factors = dataset.repeat_factors[torch.as_tensor(indices, dtype=torch.long)]


class RepeatFactorWrapper(Dataset):
    """Each epoch lists item i floor(r_i) times, plus once more with probability frac(r_i).

    The wrapped dataset's `repeat_factors` ([N] float) give r; all ones disables repetition.
    The draw depends only on `seed + epoch`, so every rank builds the same epoch list, and the
    length is only known after `set_epoch`.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.epoch_ids: Tensor | None = None
        self._seed = seed
        self._int_part = torch.trunc(dataset.repeat_factors)
        self._frac_part = dataset.repeat_factors - self._int_part

    def _get_epoch_indices(self, generator: torch.Generator) -> Tensor:
        """[M] int64 indices into the wrapped dataset for one epoch, each repeated by its factor."""
        extra = torch.rand(len(self._frac_part), generator=generator) < self._frac_part
        repeats = (self._int_part + extra.float()).long()
        return torch.repeat_interleave(torch.arange(len(repeats), dtype=torch.int64), repeats)

    def set_epoch(self, epoch: int) -> None:
        generator = torch.Generator()
        generator.manual_seed(self._seed + epoch)
        self.epoch_ids = self._get_epoch_indices(generator)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        if self.epoch_ids is None:
            # The unwrapped length would be silently wrong, so refuse until the epoch is set.
            raise RuntimeError("RepeatFactorWrapper has no length before set_epoch(epoch) is called")
        return len(self.epoch_ids)

    def __getitem__(self, idx: int):
        if self.epoch_ids is None:
            raise RuntimeError("RepeatFactorWrapper: call set_epoch(epoch) before indexing")
        return self.dataset[int(self.epoch_ids[idx])]
