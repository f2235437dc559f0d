"""One training step: forward under autocast, loss, backward, and (every N batches) the update.

The step does not wait for the device. Whether a loss is finite, and whether it depends on any
trainable weight, is settled by an all-reduce on the device, so every rank takes the same decision
(DDP's gradient all-reduce would hang otherwise). An optimizer that takes `found_inf` (the fused
Adam, AdamW and SGD) then skips a bad update on the device, and the flags are read in `report`,
which the trainer calls at its log steps. There `max_nonfinite_steps` non-finite losses in a row
stop the run. Other optimizers, and float16's GradScaler (which sets `found_inf` itself), need the
decision on the host: their steps read the flags right after the forward, as the reference does.
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
    # "loss" (what is optimised) and its parts, detached and still on the device: reading them waits for it.
    losses: dict[str, Tensor] = field(default_factory=dict)
    batch_size: int = 0
    skipped: bool = False  # skipped on the host; an update skipped on the device counts as stepped
    optimizer_stepped: bool = False
    grad_norm: Tensor | None = None


@dataclass
class Verdict:
    """One batch's flags, the minimum over ranks: [loss finite, loss has a graph], 1.0 or 0.0."""

    flags: Tensor
    losses: dict[str, Tensor]
    videos: Tensor | None  # the batch's object identifiers, for naming its videos in a warning
    step: int  # the global step the batch was trained in


def batch_size_of(batch: Any) -> int:
    """Videos in a `BatchedVideoDatapoint` (images are [T, B, 3, H, W])."""
    if hasattr(batch, "num_videos"):
        return int(batch.num_videos)
    return int(batch.img_batch.shape[1])


def object_identifiers(batch: Any) -> Tensor | None:
    try:
        return batch.metadata.unique_objects_identifier
    except AttributeError:
        return None


def video_ids_of(identifiers: Tensor | None) -> list[int]:
    """The dataset video ids in `object_identifiers(batch)`, for error messages."""
    if identifiers is None:
        return []
    return sorted({int(i) for i in identifiers[..., 0].flatten().tolist()})


def split_loss(loss: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """(the loss to back-propagate, all parts detached for logging)."""
    if isinstance(loss, Mapping):
        core = loss[CORE_LOSS_KEY]
        parts = {name: value.detach() for name, value in loss.items() if name != CORE_LOSS_KEY}
    else:
        core, parts = loss, {}
    return core, {"loss": core.detach(), **parts}


def gradient_norm(model: nn.Module) -> Tensor:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def touch_every_weight(model: nn.Module) -> Tensor:
    """A zero that depends on every trainable weight: its backward gives each one a zero gradient,
    so DDP's gradient all-reduce runs on a rank whose loss has no graph."""
    return sum(p.reshape(-1)[0] * 0.0 for p in model.parameters() if p.requires_grad)


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
        self.unreported: list[Verdict] = []
        self.skip_update: Tensor | None = None  # 1.0 when a batch of the update under way was bad

    @property
    def skips_on_device(self) -> bool:
        optimizer = self.optim.optimizer
        return getattr(optimizer, "_step_supports_amp_scaling", False) and not self.scaler.is_enabled()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_loss(self, batch: Any, model: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
        with self.autocast():
            outputs = model(batch)
            loss = self.loss[batch.dict_key](outputs, batch.masks)
        return split_loss(loss)

    def __call__(
        self, batch: Any, *, micro_index: int, is_last_in_epoch: bool, where: float, rank: int, global_step: int
    ) -> StepResult:
        """Trains on one batch; `micro_index` counts batches since the last optimizer update, `global_step`
        (from 1) names the step in warnings."""
        first = micro_index % self.accumulation_steps == 0
        update = (micro_index + 1) % self.accumulation_steps == 0 or is_last_in_epoch
        if first:
            # None rather than zeros: AdamW would otherwise still move weights with zero grads.
            self.optim.zero_grad(set_to_none=True)
            self.skip_update = None
        is_ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        no_sync = self.model.no_sync() if is_ddp and not update else contextlib.nullcontext()
        with no_sync:
            core, losses = self.forward_loss(batch, self.model)
            verdict = self._verdict(core, losses, batch, global_step)
            self.unreported.append(verdict)
            if self.skips_on_device:
                bad = 1.0 - verdict.flags.min()
                self.skip_update = bad if self.skip_update is None else torch.maximum(self.skip_update, bad)
                if not core.requires_grad:
                    core = touch_every_weight(self.model)
            elif self.report(rank):
                self.optim.zero_grad(set_to_none=True)
                return StepResult(losses=losses, batch_size=batch_size_of(batch), skipped=True)
            self.scaler.scale(core / self.accumulation_steps).backward()
        result = StepResult(losses=losses, batch_size=batch_size_of(batch))
        if update:
            result.grad_norm = self._apply_update(where, rank)
            result.optimizer_stepped = True
        return result

    def _verdict(self, core: Tensor, losses: dict[str, Tensor], batch: Any, global_step: int) -> Verdict:
        finite = torch.isfinite(core.detach()).float()
        has_graph = torch.full((), float(core.requires_grad), device=finite.device)
        # Every rank must take the same branch, or DDP's gradient all-reduce would wait forever.
        flags = all_reduce_min(torch.stack([finite, has_graph]))
        return Verdict(flags=flags, losses=losses, videos=object_identifiers(batch), step=global_step)

    def report(self, rank: int) -> bool:
        """Reads the flags of the batches trained since the last report (this waits for the device),
        logs the skipped ones, and stops the run after too many non-finite losses in a row.

        Returns whether the last batch was skipped.
        """
        if not self.unreported:
            return False
        verdicts, self.unreported = self.unreported, []
        skipped = False
        for verdict, (finite, has_graph) in zip(verdicts, torch.stack([v.flags for v in verdicts]).tolist()):
            skipped = finite < 1 or has_graph < 1
            if finite < 1:
                self._on_nonfinite(verdict, rank)
                continue
            self.nonfinite_in_a_row = 0
            if has_graph < 1:
                # E.g. every frame was prompted with its ground-truth mask, which the model passes
                # through unchanged (use_mask_input_as_output_without_sam): nothing to learn from.
                logging.info(f"rank {rank}, step {verdict.step}: loss does not depend on any trainable weight; skipped")
        return skipped

    def _apply_update(self, where: float, rank: int) -> Tensor:
        self.updating = True
        self.scaler.unscale_(self.optim.optimizer)
        # The clipper returns the norm before clipping; without one, measure it for the logs.
        norm = self.gradient_clipper(model=self.model) if self.gradient_clipper is not None else None
        norm = gradient_norm(self.model) if norm is None else norm
        if self.gradient_logger is not None:
            self.gradient_logger(self.model, rank=rank, where=where)
        optimizer = self.optim.optimizer
        if self.skips_on_device:
            # The fused kernels leave weights, moments and step counts alone when `found_inf` is 1.
            optimizer.found_inf = self.skip_update
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        else:
            # With float16 the scaler skips the update when the unscaled gradients hold inf/NaN.
            self.scaler.step(optimizer)
        self.scaler.update()
        return norm

    def _on_nonfinite(self, verdict: Verdict, rank: int) -> None:
        self.nonfinite_in_a_row += 1
        losses = {name: float(value) for name, value in verdict.losses.items()}
        videos = video_ids_of(verdict.videos)
        if math.isfinite(losses["loss"]):
            what = "non-finite loss on another rank"
        else:
            what = f"non-finite loss {losses} on videos {videos}"
        logging.warning(
            f"rank {rank}, step {verdict.step}: {what}; skipped "
            f"({self.nonfinite_in_a_row}/{self.max_nonfinite_steps} in a row)"
        )
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (the last in step {verdict.step}, "
                f"on videos {videos}); "
                "stopping. The last checkpoint holds finite weights. Try a lower scratch.base_lr, "
                "gradient clipping, or amp_dtype bfloat16; raise trainer.optim.max_nonfinite_steps to tolerate more."
            )
