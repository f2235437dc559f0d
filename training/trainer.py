"""`Trainer`: the training loop, configured by the official `trainer:` keys.

The loop itself is short; the work lives in named pieces:
    training.engine.step          forward/backward/update of one batch (AMP, accumulation, NaN)
    training.engine.checkpointer  atomic checkpoints and exact resume
    training.engine.progress      banner, progress lines, TensorBoard scalars, summaries
    training.engine.validation_hook  metrics on `data.val`, checkpoint_best.pt, early stopping
    training.engine.run_summary   the closing summary and the picture of predictions
    training.utils.distributed    process group and collectives
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from training.engine.checkpointer import (
    BEST_NAME,
    LATEST_NAME,
    Checkpointer,
    capture_rng_state,
    model_state_for_saving,
    restore_rng_state,
)
from training.engine.options import (
    CheckpointConf,
    CudaConf,
    DistributedConf,
    LoggingConf,
    OptimConf,
    from_mapping,
)
from training.engine.parallelize import apply_training_optimizations
from training.engine.progress import ProgressReporter
from training.engine.step import CORE_LOSS_KEY, TrainStep
from training.engine.trainer_setup import TrainerSetupMixin
from training.engine.validation_hook import ValidationConf, ValidationHook
from training.utils.checkpoint_utils import (
    load_state_dict_into_model,
    save_checkpoint_atomic,
)
from training.utils.distributed import (
    all_gather_object,
    barrier,
    get_world_size,
    unwrap_ddp_if_wrapped,
)
from training.utils.train_utils import Phase

__all__ = ["Trainer", "CORE_LOSS_KEY", "unwrap_ddp_if_wrapped"]


class Trainer(TrainerSetupMixin):
    """Trains (and/or validates) a model with DDP on CPU or GPU.

    Keyword-only, with the official keys: `data` ({"train": ..., "val": ...} dataset configs with
    `get_loader(epoch)`), `model`, `logging`, `checkpoint`, `max_epochs`, `mode` ("train",
    "train_only" or "val"), `accelerator` ("cuda" or "cpu"), `seed_value`, `val_epoch_freq`,
    `distributed`, `cuda`, `env_variables`, `optim`, `meters`, `loss` ({dict_key: loss config}),
    and `validation` (metrics, best checkpoint and early stopping; see `ValidationConf`).
    """

    def __init__(
        self,
        *,
        # What is trained, on what, towards what.
        model: Mapping[str, Any], data: Mapping[str, Any], loss: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None, optim_overrides: Any = None,
        model_optimizations: Mapping[str, Any] | None = None,
        # For how long, and how it is checked.
        max_epochs: int, mode: str = "train", val_epoch_freq: int = 1,
        validation: Mapping[str, Any] | None = None, meters: Mapping[str, Any] | None = None,
        # Where it runs.
        accelerator: str = "cuda", distributed: Mapping[str, Any] | None = None, cuda: Mapping[str, Any] | None = None,
        env_variables: Mapping[str, Any] | None = None, seed_value: int = 123,
        # What it writes.
        logging: Mapping[str, Any], checkpoint: Mapping[str, Any],
    ) -> None:  # fmt: skip
        if mode not in ("train", "train_only", "val"):
            raise ValueError(f"trainer.mode is {mode!r}; use 'train', 'train_only' or 'val'")
        for name, value in (env_variables or {}).items():
            os.environ[str(name)] = str(value)
        self.start_time = time.time()
        self.data_conf, self.model_conf, self.loss_conf, self.meters_conf = data, model, loss, meters
        self.logging_conf = from_mapping(LoggingConf, logging, "trainer.logging")
        self.checkpoint_conf = from_mapping(CheckpointConf, checkpoint, "trainer.checkpoint")
        self.optim_conf = from_mapping(OptimConf, optim, "trainer.optim")
        self.max_epochs, self.mode, self.val_epoch_freq = int(max_epochs), mode, val_epoch_freq
        self.seed_value = seed_value
        self.validation_conf = from_mapping(ValidationConf, validation, "trainer.validation")
        dist_conf = from_mapping(DistributedConf, distributed, "trainer.distributed")
        cuda_conf = from_mapping(CudaConf, cuda, "trainer.cuda")

        self._setup_device_and_process_group(accelerator, dist_conf, cuda_conf)
        self._setup_logging_and_seed()
        self._setup_components()
        self.model.to(self.device)
        self._construct_optimizer()
        self._setup_datasets()
        self.validation = self._make_validation_hook()
        self.checkpointer = Checkpointer(self.checkpoint_conf, self.rank)
        self.checkpointer.prepare_resume_from()
        self.load_checkpoint()
        # Checkpointing and compilation wrap forwards from outside, after weights are loaded and
        # before DDP, so state-dict names stay those of the plain model.
        self.model = apply_training_optimizations(self.model, **(model_optimizations or {}))
        self._wrap_ddp(dist_conf)
        self.train_step = self._make_train_step()
        self._log_banner()
        barrier()

    # ---- checkpoints -------------------------------------------------------------------

    def checkpoint_payload(self, *, epoch: int, batch_in_epoch: int, rng: list[Any]) -> dict[str, Any]:
        """Everything needed to continue at (epoch, batch_in_epoch); `rng` holds one state per rank."""
        payload = {
            "model": model_state_for_saving(self.model, self.checkpoint_conf.skip_saving_parameters),
            "optimizer": self.optim.optimizer.state_dict(),
            "loss": self.loss.state_dict(),
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "steps": dict(self.steps),
            "time_elapsed": self.time_elapsed(),
            "best_meter_values": dict(self.best_meter_values),
            "rng": {"now": rng, "epoch_start": self.all_epoch_start_rng if batch_in_epoch > 0 else None},
        }
        if self.scaler.is_enabled():
            payload["scaler"] = self.scaler.state_dict()
        if self.validation is not None:
            payload["validation"] = self.validation.state_dict()
        return payload

    def save_checkpoint(self, epoch: int, checkpoint_names: list[str] | None = None, batch_in_epoch: int = 0) -> None:
        """Writes `checkpoint.pt` (and any kept copies) for resuming at (epoch, batch_in_epoch).

        Called on every rank: the RNG states of all ranks are gathered so each can resume its own.
        """
        names = checkpoint_names or self.checkpointer.names_for_epoch_end(epoch)
        rng = all_gather_object(capture_rng_state())
        payload = self.checkpoint_payload(epoch=epoch, batch_in_epoch=batch_in_epoch, rng=rng)
        self.checkpointer.save(payload, names)

    def load_checkpoint(self) -> None:
        path = self.checkpointer.find_resume_checkpoint()
        if path is None:
            self._init_model_state()
            return
        if self.checkpoint_conf.initialize_after_preemption:
            self._call_model_initializer()
        checkpoint = self.checkpointer.load(path)
        self._restore(checkpoint)
        self.resumed_from = path

    def _restore(self, checkpoint: Mapping[str, Any]) -> None:
        load_state_dict_into_model(
            state_dict=checkpoint["model"],
            model=self.model,
            ignore_missing_keys=self.checkpoint_conf.skip_saving_parameters,
        )
        self.optim.optimizer.load_state_dict(checkpoint["optimizer"])
        self.loss.load_state_dict(checkpoint["loss"], strict=True)
        self.epoch = int(checkpoint["epoch"])
        self.batch_in_epoch = int(checkpoint.get("batch_in_epoch", 0))
        self.steps = {Phase.TRAIN: 0, Phase.VAL: 0, **checkpoint["steps"]}
        self.ckpt_time_elapsed = float(checkpoint.get("time_elapsed") or 0.0)
        self.best_meter_values = dict(checkpoint.get("best_meter_values", {}))
        if self.scaler.is_enabled() and "scaler" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.validation is not None and "validation" in checkpoint:
            self.validation.load_state_dict(checkpoint["validation"])
        self.resume_rng = self._own_rng_states(checkpoint.get("rng"))

    def _own_rng_states(self, rng: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """This rank's saved RNG states, or None when the checkpoint has none for it."""
        if not rng or not rng.get("now") or len(rng["now"]) != get_world_size():
            if self.rank == 0 and rng is not None:
                logging.warning("the checkpoint's RNG states are for another number of ranks; random streams restart")
            return None
        epoch_start = rng.get("epoch_start")
        return {"now": rng["now"][self.rank], "epoch_start": epoch_start[self.rank] if epoch_start else None}

    def time_elapsed(self) -> float:
        return time.time() - self.start_time + self.ckpt_time_elapsed

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        if self.mode in ("train", "train_only"):
            self.run_train()
        else:
            self.run_val()
        self._log_final_summary()
        self.logger.close()

    def run_train(self) -> None:
        if self.validation is not None and self.validation.should_stop:
            logging.info("early stopping was reached before this run; nothing to train (see val_stats.json)")
            return
        while self.epoch < self.max_epochs:
            summary = self.train_epoch()
            if self.stopped_early:
                return  # mid-epoch: the step validation that decided it has saved the checkpoint
            if self.rank == 0:
                self.logger.log_dict(summary, self.epoch)
                with open(os.path.join(self.logging_conf.log_dir, "train_stats.json"), "a") as f:
                    f.write(json.dumps(summary) + "\n")
            self.epoch += 1
            self.batch_in_epoch = 0
            names = self.checkpointer.names_for_epoch_end(self.epoch)
            if self._validation_due_after_epoch() and self.run_val():
                names.append(BEST_NAME)
            self.save_checkpoint(self.epoch, names)
            if self.stopped_early:
                return

    @property
    def stopped_early(self) -> bool:
        return self.validation is not None and self.validation.should_stop

    def _validation_due_after_epoch(self) -> bool:
        if self.validation is None or self.mode != "train":
            return False
        return self.validation.due_after_epoch(
            epochs_done=self.epoch, max_epochs=self.max_epochs, epoch_freq=self.val_epoch_freq, step=self.steps[Phase.TRAIN]
        )

    def _begin_epoch(self) -> Any:
        """The epoch's loader; when resuming mid-epoch, built from the RNG the epoch started with."""
        resume = self.resume_rng
        if resume is not None:
            epoch_rng = resume["epoch_start"] if self.batch_in_epoch > 0 else resume["now"]
            if epoch_rng is not None:
                restore_rng_state(epoch_rng)
            else:
                logging.warning("the checkpoint lacks this epoch's starting RNG state; data order may differ")
        self.all_epoch_start_rng = all_gather_object(capture_rng_state())
        loader = self.train_dataset.get_loader(epoch=int(self.epoch))
        barrier()
        return loader

    def train_epoch(self) -> dict[str, float]:
        loader = self._begin_epoch()
        steps_in_epoch = len(loader)
        self.progress.start_epoch(self.epoch, self.max_epochs, steps_in_epoch, self.batch_in_epoch)
        self.model.train()
        batches = iter(loader)
        # Replays the batches already trained on, so data order and augmentations stay identical.
        for _ in range(self.batch_in_epoch):
            next(batches)
        if self.resume_rng is not None:
            restore_rng_state(self.resume_rng["now"])
            self.resume_rng = None
        end = time.time()
        for batch_index in range(self.batch_in_epoch, steps_in_epoch):
            batch = next(batches)
            data_seconds = time.time() - end
            self._train_one_batch(batch, batch_index, steps_in_epoch, data_seconds, end)
            if self.stopped_early:
                break
            end = time.time()
        return self.progress.end_epoch(self.steps[Phase.TRAIN])

    def _train_one_batch(self, batch: Any, batch_index: int, steps_in_epoch: int, data_seconds: float, start: float) -> None:
        batch = batch.to(self.device, non_blocking=True)
        exact_epoch = self.epoch + batch_index / steps_in_epoch
        self.where = exact_epoch / self.max_epochs
        if self.where < 1.0:
            self.optim.step_schedulers(self.where, step=int(exact_epoch * steps_in_epoch))
        result = self.train_step(
            batch,
            micro_index=batch_index,
            is_last_in_epoch=batch_index == steps_in_epoch - 1,
            where=self.where,
            rank=self.rank,
            global_step=self.steps[Phase.TRAIN] + 1,
        )
        self.steps[Phase.TRAIN] += 1
        self.batch_in_epoch = batch_index + 1
        self.boundary_rng = capture_rng_state()
        self.train_step.updating = False
        if self.progress.reports_at(self.steps[Phase.TRAIN]) or self.batch_in_epoch >= steps_in_epoch:
            # The step's only wait for the device: the skipped steps since the last report are logged
            # (and too many non-finite losses in a row stop the run) here, on every rank alike.
            self.train_step.report(self.rank)
        self.progress.step(
            global_step=self.steps[Phase.TRAIN],
            batch_in_epoch=self.batch_in_epoch,
            losses=result.losses,
            batch_size=result.batch_size,
            data_seconds=data_seconds,
            step_seconds=time.time() - start,
            lrs=[group["lr"] for group in self.optim.optimizer.param_groups],
            grad_norm=result.grad_norm,
        )
        # Only after an optimizer update: gradients accumulated so far are not part of a checkpoint.
        # The epoch's last batch is left to the epoch-end checkpoint and validation.
        if not (result.optimizer_stepped or result.skipped) or self.batch_in_epoch >= steps_in_epoch:
            return
        step, every = self.steps[Phase.TRAIN], self.checkpoint_conf.save_every_steps
        names = [LATEST_NAME] if every > 0 and step % every == 0 else []
        if self.validation is not None and self.mode == "train" and self.validation.due_after_step(step):
            names = [LATEST_NAME, BEST_NAME] if self.run_val() else [LATEST_NAME]
        if names:
            self.save_checkpoint(self.epoch, names, batch_in_epoch=self.batch_in_epoch)

    def snapshot_for_preemption(self) -> bool:
        """Saves the state at the last step boundary from a signal handler on rank 0 (no collectives).

        Returns False (the last regular checkpoint then serves) when the signal arrived while an
        optimizer update was being applied or gradients were half accumulated.
        """
        mid_accumulation = self.batch_in_epoch % self.optim_conf.gradient_accumulation_steps != 0
        if self.train_step.updating or mid_accumulation or self.rank != 0 or self.boundary_rng is None:
            return False
        rng = [self.boundary_rng] if get_world_size() == 1 else []
        payload = self.checkpoint_payload(epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, rng=rng)
        save_checkpoint_atomic(payload, self.checkpointer.latest_path)
        logging.info(f"preemption: saved {self.checkpointer.latest_path} at step {self.steps[Phase.TRAIN]}")
        return True

    def run_val(self) -> bool:
        """One validation round on every rank; True when its score is a new best."""
        if self.validation is None:
            return False
        epochs_done = self.epoch + self.batch_in_epoch / max(self.steps_per_epoch or 1, 1)
        return self.validation.run(self.model, epoch=epochs_done, step=self.steps[Phase.TRAIN])

    def _make_validation_hook(self) -> ValidationHook | None:
        if self.val_dataset is None:
            return None
        return ValidationHook(
            self.validation_conf,
            dataset=self.val_dataset,
            rank=self.rank,
            device=self.device,
            logger=self.logger,
            log_dir=self.logging_conf.log_dir,
        )

    def _make_train_step(self) -> TrainStep:
        return TrainStep(
            model=self.model,
            loss=self.loss,
            optim=self.optim,
            scaler=self.scaler,
            gradient_clipper=self.gradient_clipper,
            gradient_logger=self.gradient_logger,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
            accumulation_steps=self.optim_conf.gradient_accumulation_steps,
            max_nonfinite_steps=self.optim_conf.max_nonfinite_steps,
        )

    def _make_progress(self) -> ProgressReporter:
        steps_per_epoch = self.steps_per_epoch or 0
        return ProgressReporter(
            rank=self.rank,
            world_size=get_world_size(),
            tb_logger=self.logger,
            log_freq=self.logging_conf.log_freq,
            scalar_freq=self.logging_conf.log_scalar_frequency,
            device=self.device,
            total_steps=steps_per_epoch * self.max_epochs,
        )

