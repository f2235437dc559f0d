"""The training config both trainers run in a benchmark case.

It starts from the official MOSE fine-tune config (`sam2.1_hiera_b+_MOSE_finetune.yaml`, read from
the reference sources so both sides get the same text), keeps its model, prompt-simulation,
loss and optimizer settings, and changes only what a case sets: model size (trunk and neck from
the official sam2.1 model config of that size), resolution, frames, objects, batch, precision,
device, the dataset paths and the run directory. The result is one YAML file per side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

MODEL_CONFIGS = {
    "tiny": "sam2.1_hiera_t.yaml",
    "small": "sam2.1_hiera_s.yaml",
    "base_plus": "sam2.1_hiera_b+.yaml",
    "large": "sam2.1_hiera_l.yaml",
}
MOSE_CONFIG = "sam2/configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml"


@dataclass(frozen=True)
class TrainCase:
    """One benchmark setting; `amp_dtype` None trains in float32."""

    name: str
    model_size: str
    resolution: int
    num_frames: int
    max_num_objects: int
    batch_size: int = 1
    amp_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.model_size not in MODEL_CONFIGS:
            raise ValueError(f"model_size is {self.model_size!r}; expected one of {sorted(MODEL_CONFIGS)}")
        if self.resolution % 32:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 32 (Hiera's total stride)")


CPU_CASES = [
    TrainCase("tiny-256px-1f", "tiny", 256, num_frames=1, max_num_objects=2),
    TrainCase("tiny-256px-4f", "tiny", 256, num_frames=4, max_num_objects=2),
]
GPU_CASES = [
    TrainCase("base_plus-1024px-8f", "base_plus", 1024, num_frames=8, max_num_objects=3, amp_dtype="bfloat16"),
    TrainCase("tiny-1024px-8f", "tiny", 1024, num_frames=8, max_num_objects=3, amp_dtype="bfloat16"),
    TrainCase("small-1024px-8f", "small", 1024, num_frames=8, max_num_objects=3, amp_dtype="bfloat16"),
    TrainCase("large-1024px-8f", "large", 1024, num_frames=8, max_num_objects=3, amp_dtype="bfloat16"),
]


def trunk_and_neck(reference_root: Path, model_size: str) -> dict[str, Any]:
    """The official `model.image_encoder` node of `model_size` (trunk and neck sizes)."""
    cfg = OmegaConf.load(reference_root / "sam2" / "configs" / "sam2.1" / MODEL_CONFIGS[model_size])
    return OmegaConf.to_container(cfg.model.image_encoder)


def build_train_config(
    reference_root: Path,
    case: TrainCase,
    *,
    device: str,
    img_folder: Path,
    gt_folder: Path,
    init_checkpoint: Path,
    run_dir: Path,
    num_workers: int,
) -> dict[str, Any]:
    """The full training config (a plain dict) for `case`: one epoch, one step per video in the dataset."""
    cfg = OmegaConf.to_container(OmegaConf.load(reference_root / MOSE_CONFIG))
    scratch = cfg["scratch"]
    scratch.update(
        resolution=case.resolution,
        train_batch_size=case.batch_size,
        num_train_workers=num_workers,
        num_frames=case.num_frames,
        max_num_objects=case.max_num_objects,
        num_epochs=1,
        phases_per_epoch=1,
    )
    cfg["dataset"].update(img_folder=str(img_folder), gt_folder=str(gt_folder), file_list_txt=None, multiplier=1)

    trainer = cfg["trainer"]
    trainer["accelerator"] = device
    trainer["distributed"]["backend"] = "nccl" if device == "cuda" else "gloo"
    trainer["optim"]["amp"] = {"enabled": case.amp_dtype is not None, "amp_dtype": case.amp_dtype or "bfloat16"}
    trainer["data"]["train"]["num_workers"] = num_workers

    model = trainer["model"]
    encoder = trunk_and_neck(reference_root, case.model_size)
    encoder["trunk"]["drop_path_rate"] = model["image_encoder"]["trunk"].get("drop_path_rate", 0.0)
    model["image_encoder"] = encoder
    # RoPE tables sized for the case's feature map, as a user fine-tuning at this size would set.
    feat = case.resolution // 16
    layer = model["memory_attention"]["layer"]
    layer["self_attention"]["feat_sizes"] = [feat, feat]
    layer["cross_attention"]["feat_sizes"] = [feat, feat]

    ckpt = trainer["checkpoint"]
    ckpt["model_weight_initializer"]["state_dict"]["checkpoint_path"] = str(init_checkpoint)
    cfg["launcher"].update(num_nodes=1, gpus_per_node=1, experiment_log_dir=str(run_dir))
    cfg["submitit"]["use_cluster"] = False
    return cfg


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    """Writes `cfg` as a global-package Hydra config (the official files carry the same header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# @package _global_\n\n" + OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


# The prompt simulation without its draws, for runs of the model and loss that compare the two
# sides op by op or byte by byte: every prompted frame gets clicks (no boxes, no masks, no
# clicks sampled from the ground truth) and the prompted and corrected frames are fixed. It is
# the MOSE config's heaviest draw: every correction round runs.
DETERMINISTIC_PROMPTS = {
    "prob_to_use_pt_input_for_train": 1.0,
    "prob_to_use_box_input_for_train": 0.0,
    "prob_to_sample_from_gt_for_train": 0.0,
    "rand_init_cond_frames_for_train": False,
    "rand_frames_to_correct_for_train": False,
}


def model_and_loss_configs(reference_root: Path, case: TrainCase, *, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The resolved `trainer.model` (as `SAM2Train`) and `trainer.loss.all` configs of `case`, for
    runs of the model and loss without the trainer and its data."""
    from training.utils.train_utils import register_omegaconf_resolvers

    unused = Path("/nonexistent")
    cfg = build_train_config(
        reference_root, case, device=device, img_folder=unused, gt_folder=unused, init_checkpoint=unused,
        run_dir=unused, num_workers=0,
    )  # fmt: skip
    register_omegaconf_resolvers()
    resolved = OmegaConf.create(cfg)
    OmegaConf.resolve(resolved)
    trainer = OmegaConf.to_container(resolved.trainer)
    model = {**trainer["model"], "_target_": "training.model.sam2.SAM2Train"}
    loss = {**trainer["loss"]["all"], "_target_": "training.loss_fns.MultiStepMultiMasksAndIous"}
    return model, loss
