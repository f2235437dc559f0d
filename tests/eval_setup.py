"""A tiny random SAM 2.1 model for the evaluation tests, in memory or as files for the CLI."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sam2.utils.video_frames import load_video_frames
from tests.predictor_setup import tiny_model_config
from training.evaluation.samples import EvalClip
from training.utils.data_utils import BatchedVideoDatapoint, BatchedVideoMetaData


def tiny_eval_model(seed: int = 0, target: str = "sam2.modeling.sam2_base.SAM2Base") -> torch.nn.Module:
    """Random weights with noise everywhere and a raised object-score bias, so that frames carry
    real (if poor) masks instead of "no object"."""
    torch.manual_seed(seed)
    model = instantiate(OmegaConf.create(tiny_model_config(target)), _recursive_=True)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(4.0)
    return model.eval()


def write_tiny_model_files(folder: Path, seeds: tuple[int, ...] = (0,)) -> tuple[str, list[str]]:
    """(model YAML with a `model:` node, one `{"model": state_dict}` checkpoint per seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "tiny_model.yaml"
    config_path.write_text(yaml.safe_dump({"model": tiny_model_config()}))
    checkpoints = []
    for seed in seeds:
        path = folder / f"tiny_seed{seed}.pt"
        torch.save({"model": tiny_eval_model(seed).state_dict()}, path)
        checkpoints.append(str(path))
    return str(config_path), checkpoints


def _resize_mask(mask, image_size: int) -> torch.Tensor:
    resized = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=(image_size,) * 2)
    return resized[0, 0] > 0.5


def batch_from_clips(clips: list[EvalClip], image_size: int) -> BatchedVideoDatapoint:
    """A training-style batch (frames resized and normalised, masks at that size) of clips."""
    frames = torch.stack([load_video_frames(c.frames, image_size, True)[0] for c in clips], dim=1)
    masks, owners, ids = [], [], []
    for t in range(clips[0].num_frames):
        frame_masks = [
            _resize_mask(c.gt_masks[t, o], image_size) for c in clips for o in range(len(c.object_ids))
        ]
        masks.append(torch.stack(frame_masks))
        owners.append([[t, b] for b, c in enumerate(clips) for _ in c.object_ids])
        ids.append([[b, obj_id, t] for b, c in enumerate(clips) for obj_id in c.object_ids])
    num_frames = len(masks)
    return BatchedVideoDatapoint(
        img_batch=frames,
        obj_to_frame_idx=torch.tensor(owners, dtype=torch.int),
        masks=torch.stack(masks),
        metadata=BatchedVideoMetaData(
            unique_objects_identifier=torch.tensor(ids), frame_orig_size=torch.zeros(num_frames, len(ids[0]), 2).long()
        ),
        dict_key="val",
        batch_size=[num_frames],
    )
