"""One training step: forward under autocast, loss, backward, and (every N batches) the update.

Non-finite losses skip their step on every rank together (ranks must agree, or DDP's gradient
all-reduce would hang) and stop the run after `max_nonfinite_steps` in a row.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from training.utils.distributed import all_reduce_min

CORE_LOSS_KEY = "core_loss"


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class StepResult:
    losses: dict[str, float] = field(default_factory=dict)  # "loss" (what is optimised) and its parts
    batch_size: int = 0
    skipped: bool = False
    optimizer_stepped: bool = False
    grad_norm: float | None = None


def batch_size_of(batch: Any) -> int:
    """Videos in a `BatchedVideoDatapoint` (images are [T, B, 3, H, W])."""
    if hasattr(batch, "num_videos"):
        return int(batch.num_videos)
    return int(batch.img_batch.shape[1])


def video_ids_of(batch: Any) -> list[int]:
    """The dataset video ids in a batch, for error messages (empty when the batch has no metadata)."""
    try:
        ids = batch.metadata.unique_objects_identifier[..., 0]
        return sorted({int(i) for i in ids.flatten().tolist()})
    except AttributeError:
        return []


def split_loss(loss: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """(the loss to back-propagate, all parts as floats for logging)."""
    if isinstance(loss, Mapping):
        core = loss[CORE_LOSS_KEY]
        parts = {name: float(value.detach()) for name, value in loss.items() if name != CORE_LOSS_KEY}
    else:
        core, parts = loss, {}
    return core, {"loss": float(core.detach()), **parts}


def gradient_norm(model: nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


class TrainStep:
    """Runs batches through the model and applies optimizer updates."""

    def __init__(
        self,
        *,
        model: nn.Module,
        loss: nn.ModuleDict,
        optim: Any,
        scaler: torch.amp.GradScaler,
        gradient_clipper: Any,
        gradient_logger: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        accumulation_steps: int,
        max_nonfinite_steps: int,
    ) -> None:
        self.model, self.loss, self.optim, self.scaler = model, loss, optim, scaler
        self.gradient_clipper, self.gradient_logger = gradient_clipper, gradient_logger
        self.device, self.autocast_dtype = device, autocast_dtype
        self.accumulation_steps = accumulation_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_in_a_row = 0
        # True from the start of an optimizer update until the trainer has recorded it.
        self.updating = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_loss(self, batch: Any, model: nn.Module) -> tuple[Tensor, dict[str, float]]:
        with self.autocast():
            outputs = model(batch)
            loss = self.loss[batch.dict_key](outputs, batch.masks)
        return split_loss(loss)

    def __call__(self, batch: Any, *, micro_index: int, is_last_in_epoch: bool, where: float, rank: int) -> StepResult:
        """Trains on one batch; `micro_index` counts batches since the last optimizer update."""
        first = micro_index % self.accumulation_steps == 0
        update = (micro_index + 1) % self.accumulation_steps == 0 or is_last_in_epoch
        if first:
            # None rather than zeros: AdamW would otherwise still move weights with zero grads.
            self.optim.zero_grad(set_to_none=True)
        is_ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        no_sync = self.model.no_sync() if is_ddp and not update else contextlib.nullcontext()
        with no_sync:
            core, losses = self.forward_loss(batch, self.model)
            # Every rank must take the same branch, or DDP's gradient all-reduce would wait forever.
            flags = torch.tensor([float(math.isfinite(losses["loss"])), float(core.requires_grad)], device=self.device)
            finite_everywhere, graph_everywhere = all_reduce_min(flags).tolist()
            if finite_everywhere < 1:
                self._on_nonfinite(batch, losses, rank)
                return StepResult(losses=losses, batch_size=batch_size_of(batch), skipped=True)
            self.nonfinite_in_a_row = 0
            if graph_everywhere < 1:
                # E.g. every frame was prompted with its ground-truth mask, which the model passes
                # through unchanged (use_mask_input_as_output_without_sam): nothing to learn from.
                logging.info(f"rank {rank}: loss does not depend on any trainable weight; step skipped")
                self.optim.zero_grad(set_to_none=True)
                return StepResult(losses=losses, batch_size=batch_size_of(batch), skipped=True)
            self.scaler.scale(core / self.accumulation_steps).backward()
        result = StepResult(losses=losses, batch_size=batch_size_of(batch))
        if update:
            result.grad_norm = self._apply_update(where, rank)
            result.optimizer_stepped = True
        return result

    def _apply_update(self, where: float, rank: int) -> float:
        self.updating = True
        self.scaler.unscale_(self.optim.optimizer)
        # The clipper returns the norm before clipping; without one, measure it for the logs.
        norm = self.gradient_clipper(model=self.model) if self.gradient_clipper is not None else None
        norm = gradient_norm(self.model) if norm is None else float(norm)
        if self.gradient_logger is not None:
            self.gradient_logger(self.model, rank=rank, where=where)
        # With fp16 the scaler skips the update when the unscaled gradients hold inf/NaN.
        self.scaler.step(self.optim.optimizer)
        self.scaler.update()
        return norm

    def _on_nonfinite(self, batch: Any, losses: Mapping[str, float], rank: int) -> None:
        self.optim.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        logging.warning(
            f"rank {rank}: non-finite loss {losses} on videos {video_ids_of(batch)}; step skipped "
            f"({self.nonfinite_in_a_row}/{self.max_nonfinite_steps} in a row)"
        )
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (last on videos {video_ids_of(batch)}); "
                "stopping. The last checkpoint holds finite weights. Try a lower scratch.base_lr, "
                "gradient clipping, or amp_dtype bfloat16; raise trainer.optim.max_nonfinite_steps to tolerate more."
            )
