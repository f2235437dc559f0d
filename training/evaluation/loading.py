"""What the evaluator needs from files: a model with its weights, and a dataset folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sam2.build_sam import build_sam2
from sam2.model_weights import load_model_weights
from training.dataset.image_folder_dataset import ImageFolderRawDataset
from training.dataset.vos_raw_dataset import PNGRawDataset

DATASET_KINDS = ("auto", "video", "image")


def build_model_from_node(node: DictConfig, checkpoint: str | None, *, device: str, config_name: str) -> nn.Module:
    """Instantiate a model config node (`_target_` + keywords) and load `checkpoint` strictly."""
    model = instantiate(node, _recursive_=True)
    if checkpoint is not None:
        load_model_weights(model, checkpoint, config_name=config_name)
    return model.to(device).eval()


def build_eval_model(
    checkpoint: str | None,
    *,
    model_config: str | None = None,
    training_config: DictConfig | None = None,
    device: str = "cpu",
) -> nn.Module:
    """A model in eval mode with `checkpoint` loaded (None: random weights).

    model_config: an official config name / path (`sam2.1_hiera_b+`, built by `build_sam2`) or a
        YAML file with a `model:` node. training_config: a composed training config, whose
        `trainer.model` is used when no model_config is given.
    """
    if model_config is not None and os.path.isfile(model_config):
        cfg = OmegaConf.load(model_config)
        node = cfg.model if "model" in cfg else cfg
        return build_model_from_node(node, checkpoint, device=device, config_name=model_config)
    if model_config is not None:
        return build_sam2(model_config, checkpoint, device=device, mode="eval")
    if training_config is not None:
        node = training_config.trainer.model
        return build_model_from_node(node, checkpoint, device=device, config_name="trainer.model")
    raise ValueError("give a model config (--model-config, e.g. sam2.1_hiera_b+) or a training config (-c)")


def _has_subfolders(folder: str) -> bool:
    return any(entry.is_dir() for entry in os.scandir(folder))


def open_dataset(img_folder: str, gt_folder: str, *, kind: str = "auto", file_list_txt: str | None = None):
    """(raw dataset, "video" | "image") for a folder pair.

    auto: sub-folders of `img_folder` are videos (DAVIS layout: `PNGRawDataset`, palette PNGs or
    one sub-folder per object), else images side by side with masks (`ImageFolderRawDataset`).
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, got {kind!r}")
    for folder, role in ((img_folder, "image folder"), (gt_folder, "mask folder")):
        if folder is None or not os.path.isdir(folder):
            raise FileNotFoundError(f"{role} {folder!r} is not a folder; check --img-folder / --gt-folder")
    if kind == "auto":
        kind = "video" if _has_subfolders(img_folder) else "image"
    if kind == "image":
        return ImageFolderRawDataset(img_folder, gt_folder, file_list_txt=file_list_txt), kind
    first_video = next((e.path for e in os.scandir(gt_folder) if e.is_dir()), None)
    per_object = first_video is not None and _has_subfolders(first_video)
    return PNGRawDataset(img_folder, gt_folder, file_list_txt=file_list_txt, is_palette=not per_object), kind


def default_checkpoint(run_dir: str | Path) -> str | None:
    """The run's best checkpoint if it wrote one, else its latest, else None."""
    for name in ("checkpoint_best.pt", "checkpoint.pt"):
        path = Path(run_dir) / "checkpoints" / name
        if path.is_file():
            return str(path)
    return None


def pick_device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
