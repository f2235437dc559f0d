"""Building what `Trainer` runs: device and process group, logging, model/loss/optimizer, data,
initial weights, DDP, and the start banner. Kept apart so that trainer.py reads as the loop.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from sam2.modeling.sam2_base import SAM2Base
from training.engine.checkpointer import BEST_NAME
from training.engine.options import CudaConf, DistributedConf
from training.engine.progress import format_banner
from training.engine.run_summary import PICTURE_NAME, log_run_summary, write_prediction_picture
from training.utils.checkpoint_utils import (
    assert_skipped_parameters_are_frozen,
    with_check_parameter_frozen,
)
from training.utils.distributed import barrier, get_world_size, setup_distributed_backend, unwrap_ddp_if_wrapped
from training.utils.logger import Logger, setup_logging
from training.utils.train_utils import Phase, get_amp_type, get_machine_local_and_dist_rank, set_seeds


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


class TrainerSetupMixin:
    """Setup steps of `training.trainer.Trainer`, in the order `__init__` calls them."""

    def _setup_device_and_process_group(self, accelerator: str, dist_conf: DistributedConf, cuda_conf: CudaConf) -> None:
        self.local_rank, _ = get_machine_local_and_dist_rank()
        if accelerator == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "trainer.accelerator is 'cuda' but no GPU is visible; train on CPU with "
                    "--num-gpus 0 (or trainer.accelerator=cpu)"
                )
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.local_rank)
            torch.backends.cudnn.deterministic = cuda_conf.cudnn_deterministic
            torch.backends.cudnn.benchmark = cuda_conf.cudnn_benchmark
            tf32 = cuda_conf.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32 if cuda_conf.matmul_allow_tf32 is None else cuda_conf.matmul_allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32 if cuda_conf.cudnn_allow_tf32 is None else cuda_conf.cudnn_allow_tf32
        elif accelerator == "cpu":
            self.device = torch.device("cpu")
        else:
            raise ValueError(f"trainer.accelerator is {accelerator!r}; use 'cuda' or 'cpu'")
        self.accelerator = accelerator
        if dist_conf.backend is None:
            dist_conf.backend = "nccl" if accelerator == "cuda" else "gloo"
        if accelerator == "cpu" and dist_conf.backend == "nccl":
            logging.warning("NCCL needs GPUs; using gloo for this CPU run")
            dist_conf.backend = "gloo"
        self.rank = self.distributed_rank = setup_distributed_backend(dist_conf.backend, dist_conf.timeout_mins)

    def _setup_logging_and_seed(self) -> None:
        conf = self.logging_conf
        os.makedirs(conf.log_dir, exist_ok=True)
        setup_logging(
            "training",
            output_dir=conf.log_dir,
            rank=self.rank,
            log_level_primary=conf.log_level_primary,
            log_level_secondary=conf.log_level_secondary,
        )
        self.seed = set_seeds(self.seed_value, self.max_epochs, self.rank)

    def _setup_components(self) -> None:
        self.epoch, self.batch_in_epoch = 0, 0
        self.steps = {Phase.TRAIN: 0, Phase.VAL: 0}
        self.where = 0.0
        self.ckpt_time_elapsed = 0.0
        self.best_meter_values: dict[str, Any] = {}
        self.resume_rng = None
        self.all_epoch_start_rng = None
        self.boundary_rng = None
        self.resumed_from: str | None = None
        self.logger = Logger(self.logging_conf)
        self.model = instantiate(self.model_conf, _convert_="all")
        total, trainable = count_parameters(self.model)
        logging.info(f"model {type(self.model).__name__}: {total:,} parameters, {trainable:,} trainable")
        self.loss = nn.ModuleDict(instantiate(self.loss_conf, _convert_="all") if self.loss_conf else {})
        self.meters = instantiate(self.meters_conf, _convert_="all") if self.meters_conf else {}
        amp = self.optim_conf.amp
        amp_on = amp.enabled and (self.device.type == "cuda" or amp.enabled_on_cpu)
        self.autocast_dtype = get_amp_type(amp.amp_dtype) if amp_on else None
        # Loss scaling only matters for float16; bfloat16 has float32's exponent range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.gradient_clipper = instantiate(self.optim_conf.gradient_clip) if self.optim_conf.gradient_clip else None
        self.gradient_logger = instantiate(self.optim_conf.gradient_logger) if self.optim_conf.gradient_logger else None

    def _construct_optimizer(self) -> None:
        from training.optimizer import construct_optimizer

        conf = self.optim_conf
        if conf.optimizer is None:
            raise ValueError("trainer.optim.optimizer is missing; e.g. {_target_: torch.optim.AdamW}")
        self.optim = construct_optimizer(self.model, conf.optimizer, conf.options, conf.param_group_modifiers)

    def _setup_datasets(self) -> None:
        data = self.data_conf or {}
        self.train_dataset = self.val_dataset = None
        if self.mode in ("train", "val") and data.get(Phase.VAL) is not None:
            self.val_dataset = instantiate(data[Phase.VAL])
        if self.mode in ("train", "train_only"):
            if data.get(Phase.TRAIN) is None:
                raise ValueError(f"trainer.mode is {self.mode!r} but trainer.data.train is missing")
            self.train_dataset = instantiate(data[Phase.TRAIN])
        self.steps_per_epoch = None
        if self.train_dataset is not None:
            self.steps_per_epoch = len(self.train_dataset.get_loader(epoch=0))
            if self.steps_per_epoch == 0:
                raise ValueError(
                    "the training data gives 0 batches per epoch: the dataset has fewer samples than "
                    "train_batch_size x ranks (drop_last). Add data or lower scratch.train_batch_size."
                )

    def _init_model_state(self) -> None:
        patterns = self.checkpoint_conf.skip_saving_parameters
        assert_skipped_parameters_are_frozen(model=self.model, patterns=patterns)
        with with_check_parameter_frozen(
            model=self.model, patterns=patterns, disabled=self.checkpoint_conf.initialize_after_preemption
        ):
            self._call_model_initializer()

    def _call_model_initializer(self) -> None:
        conf = self.checkpoint_conf.model_weight_initializer
        if conf is None:
            return
        initializer = instantiate(conf)
        if initializer is not None:
            logging.info("loading initial weights (trainer.checkpoint.model_weight_initializer)")
            self.model = initializer(model=self.model)

    def _wrap_ddp(self, dist_conf: DistributedConf) -> None:
        # One process has nothing to all-reduce, so it trains the plain model: its gradients exist
        # only from backward to the next zero_grad, not all step long in DDP's buckets (the
        # model's size again, held through the forward, where memory peaks).
        if get_world_size() > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                find_unused_parameters=dist_conf.find_unused_parameters,
                gradient_as_bucket_view=dist_conf.gradient_as_bucket_view,
            )
            if dist_conf.comms_dtype is not None:
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                compress = get_amp_type(dist_conf.comms_dtype)
                hook = default_hooks.bf16_compress_hook if compress == torch.bfloat16 else default_hooks.fp16_compress_hook
                self.model.register_comm_hook(None, hook)
        self.progress = self._make_progress()

    def _log_banner(self) -> None:
        if self.rank != 0:
            return
        run_dir = os.path.dirname(os.path.normpath(self.checkpoint_conf.save_dir))
        tb_dir = None
        if self.logger.tb_logger is not None:
            tb_dir = self.logger.tb_logger.path
        devices = f"{get_world_size()} x {self.device.type}"
        if self.device.type == "cuda":
            devices += f" ({torch.cuda.get_device_name(self.device)})"
        precision = "float32" if self.autocast_dtype is None else f"autocast {self.autocast_dtype}"
        if self.resumed_from:
            resume = f"resumed from {self.resumed_from} at epoch {self.epoch}, step {self.steps[Phase.TRAIN]}"
        else:
            resume = "fresh start"
        written = os.path.join(run_dir, "config_resolved.yaml")
        rows = [
            ("config", written if os.path.isfile(written) else "(built in code)"),
            ("run directory", run_dir),
            ("tensorboard", f"tensorboard --logdir {tb_dir}" if tb_dir else "off"),
            ("devices", f"{devices}, {self.optim_conf.gradient_accumulation_steps} batch(es) per update"),
            ("precision", precision),
            ("model", f"{type(unwrap_ddp_if_wrapped(self.model)).__name__}, {count_parameters(self.model)[1]:,} trainable parameters"),
            ("train data", self._describe_train_data()),
            ("epochs", self.max_epochs),
            ("mode", self.mode),
            ("state", resume),
            ("seed", f"{self.seed_value} (rank 0 uses {self.seed})"),
        ]
        logging.info("\n" + format_banner(rows))

    def _describe_train_data(self) -> str:
        if self.train_dataset is None:
            return "none"
        datasets = getattr(self.train_dataset, "datasets", None) or [getattr(self.train_dataset, "dataset", None)]
        sizes = [len(d) for d in datasets if d is not None and hasattr(d, "__len__")]
        samples = f"{sum(sizes)} samples, " if sizes else ""
        return f"{samples}{self.steps_per_epoch} steps/epoch on each of {get_world_size()} rank(s)"

    def _log_final_summary(self) -> None:
        # Every rank logs this to its own text log: differing values reveal ranks that drifted apart.
        checksum = sum(float(p.detach().double().sum()) for p in self.model.parameters())
        logging.info(f"rank {self.rank}: final weights checksum {checksum:.17g}")
        if self.rank == 0:
            picture = self._write_prediction_picture()
            log_run_summary(self._final_headline(), self._final_rows(picture))
        barrier()

    def _final_headline(self) -> str:
        if self.mode == "val":
            return "validation finished"
        headline = f"training finished: epoch {self.epoch}/{self.max_epochs}, {self.steps[Phase.TRAIN]} steps"
        if self.validation is not None and self.validation.should_stop:
            headline += f" (stopped early: no improvement in {self.validation.tracker.bad_validations} validations)"
        return headline

    def _final_rows(self, picture: str | None) -> list[tuple[str, str | None]]:
        latest = self.checkpointer.latest_path
        best_path = os.path.join(self.checkpoint_conf.save_dir, f"{BEST_NAME}.pt")
        best = None
        tracker = self.validation.tracker if self.validation is not None else None
        if tracker is not None and tracker.best is not None and os.path.isfile(best_path):
            best = f"{best_path} ({self.validation.metric} {tracker.best:.4f} at step {tracker.best_step})"
        tb_logger = self.logger.tb_logger
        return [
            ("checkpoint", latest if os.path.isfile(latest) else None),
            ("best", best),
            ("tensorboard", f"tensorboard --logdir {tb_logger.path}" if tb_logger is not None else None),
            ("predictions", picture),
        ]

    def _write_prediction_picture(self) -> str | None:
        """`<run>/predictions.png` of the final model on a few validation (else training) clips."""
        count = self.logging_conf.final_predictions
        model = unwrap_ddp_if_wrapped(self.model)
        data = self.val_dataset or self.train_dataset
        if count <= 0 or data is None or not isinstance(model, SAM2Base):
            return None
        path = os.path.join(os.path.dirname(os.path.normpath(self.checkpoint_conf.save_dir)), PICTURE_NAME)
        prompt = self.validation_conf.prompt
        try:
            return write_prediction_picture(model, data.get_loader(epoch=0), path, device=self.device, num_samples=count, prompt=prompt)
        except Exception as exc:  # noqa: BLE001 - the run is done and saved; a picture must not fail it
            logging.warning(f"could not draw the prediction picture ({type(exc).__name__}: {exc})")
            return None
