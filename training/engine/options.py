"""The trainer's config groups (`trainer.optim`, `trainer.checkpoint`, ...) as typed dataclasses.

Keys and defaults are the official ones, so official configs load unchanged; the few additions
(gradient accumulation, step-interval checkpoints, non-finite loss patience) default to off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def from_mapping(cls: type, values: Mapping[str, Any] | None, group: str) -> Any:
    """`cls(**values)` with a readable error naming the config group and the accepted keys."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {group}; accepted keys: {sorted(known)}")
    return cls(**values)


@dataclass
class AmpConf:
    enabled: bool = False
    amp_dtype: str = "float16"
    # Autocast on CPU is slow and rarely wanted, so CPU runs stay float32 unless this is set.
    enabled_on_cpu: bool = False


@dataclass
class OptimConf:
    optimizer: Any = None
    options: Any = None
    param_group_modifiers: Any = None
    amp: Any = None
    gradient_clip: Any = None
    gradient_logger: Any = None
    # Batches whose gradients are summed before one optimizer step.
    gradient_accumulation_steps: int = 1
    # Consecutive non-finite losses tolerated (each skips its step) before the run stops.
    max_nonfinite_steps: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.amp, AmpConf):
            self.amp = from_mapping(AmpConf, self.amp, "trainer.optim.amp")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"trainer.optim.gradient_accumulation_steps is {self.gradient_accumulation_steps}; use 1 or more"
            )


@dataclass
class DistributedConf:
    backend: str | None = None  # None: nccl on cuda, gloo on cpu
    comms_dtype: str | None = None
    find_unused_parameters: bool = False
    # Gradients live in DDP's all-reduce buckets instead of beside them: one copy, not two.
    gradient_as_bucket_view: bool = True
    timeout_mins: float = 30


@dataclass
class CudaConf:
    cudnn_deterministic: bool = False
    cudnn_benchmark: bool = True
    allow_tf32: bool = False
    matmul_allow_tf32: bool | None = None
    cudnn_allow_tf32: bool | None = None


@dataclass
class CheckpointConf:
    save_dir: str
    save_freq: int = 0  # epochs between kept `checkpoint_<epoch>.pt`; 0 keeps only the latest
    save_list: list[int] = field(default_factory=list)
    model_weight_initializer: Any = None
    save_best_meters: list[str] | None = None
    skip_saving_parameters: list[str] = field(default_factory=list)
    initialize_after_preemption: bool | None = None
    resume_from: str | None = None
    # Also write `checkpoint.pt` every this many training steps (0: only at epoch ends).
    save_every_steps: int = 0

    def __post_init__(self) -> None:
        self.save_list = list(self.save_list or [])
        self.skip_saving_parameters = list(self.skip_saving_parameters or [])
        if self.initialize_after_preemption is None:
            self.initialize_after_preemption = len(self.skip_saving_parameters) > 0


@dataclass
class LoggingConf:
    log_dir: str
    log_freq: int = 10  # steps between progress lines
    tensorboard_writer: Any = None
    log_level_primary: str = "INFO"
    log_level_secondary: str = "ERROR"
    log_scalar_frequency: int = 100  # steps between TensorBoard scalars
    log_visual_frequency: int = 100
    scalar_keys_to_log: Any = None
    log_batch_stats: bool = False
    # Clips drawn in `<run>/predictions.png` by the final model at the end of a run (0: no picture).
    final_predictions: int = 4
