"""Build SAM 2 models from their configs and load their weights.

    model = build_sam2("sam2.1_hiera_b+", "checkpoints/sam2.1_hiera_base_plus.pt")
    predictor = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt)

Configs are named as in the official package (`configs/sam2.1/sam2.1_hiera_b+.yaml`) or by short
name (`sam2.1_hiera_b+`, `sam2_hiera_l.yaml`). Weights are only ever read from local files: a
Hugging Face hub id gets an error that says which file to download.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import sam2  # noqa: F401  (registers the package's configs with Hydra)
from sam2.model_weights import guess_model_config, load_state_dict_strictly, read_model_state_dict

# Hub ids of the official releases -> (config, checkpoint file name), for users who have the files.
HF_MODEL_ID_TO_FILENAMES = {
    f"facebook/{version}-hiera-{size_name}": (
        f"configs/{version}/{version}_hiera_{size}.yaml",
        f"{version}_hiera_{size_name.replace('-', '_')}.pt",
    )
    for version in ("sam2", "sam2.1")
    for size, size_name in (("t", "tiny"), ("s", "small"), ("b+", "base-plus"), ("l", "large"))
}

_SHORT_NAME = re.compile(r"^(sam2(?:\.1)?)_hiera_(t|s|b\+|l|tiny|small|base_plus|large)(?:\.yaml)?$")
_SIZE_ALIASES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}

# Inference post-processing, as in the official builders.
_DYNAMIC_MULTIMASK = [
    # fall back to the best of 3 masks when the single-mask output is not stable
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
]
_VIDEO_POSTPROCESSING = [
    # memory holds the mask the user saw on clicked frames, not its soft version
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    # fill holes of up to 8 low-res pixels in the output masks
    "++model.fill_hole_area=8",
]


def resolve_config_name(config_file: str) -> str:
    """The Hydra config name for an official config path or a short model name.

    `sam2.1_hiera_b+`, `sam2.1_hiera_b+.yaml`, `sam2.1_hiera_base_plus` and
    `configs/sam2.1/sam2.1_hiera_b+.yaml` all give `configs/sam2.1/sam2.1_hiera_b+.yaml`; other
    names pass through unchanged.
    """
    if config_file in HF_MODEL_ID_TO_FILENAMES:
        config, ckpt = HF_MODEL_ID_TO_FILENAMES[config_file]
        raise ValueError(
            f"{config_file!r} is a Hugging Face hub id, but this package loads local files only (no "
            f"downloads at run time): download {ckpt} from https://huggingface.co/{config_file} and "
            f"call build_sam2({config!r}, 'path/to/{ckpt}')"
        )
    match = _SHORT_NAME.match(os.path.basename(config_file))
    if match and "/" not in config_file.replace(os.sep, "/"):
        version, size = match.group(1), _SIZE_ALIASES.get(match.group(2), match.group(2))
        return f"configs/{version}/{version}_hiera_{size}.yaml"
    return config_file


def _compose_model_config(config_file: str, overrides: Sequence[str]) -> Any:
    name = resolve_config_name(config_file)
    try:
        cfg = compose(config_name=name, overrides=list(overrides))
    except MissingConfigException as exc:
        known = [f"{v}_hiera_{s}" for v in ("sam2", "sam2.1") for s in ("t", "s", "b+", "l")]
        raise FileNotFoundError(
            f"no model config {config_file!r} (looked up as {name!r} among the configs of the sam2 "
            f"package); use a short name ({', '.join(known)}) or a path like "
            "'configs/sam2.1/sam2.1_hiera_b+.yaml'"
        ) from exc
    OmegaConf.resolve(cfg)
    return cfg


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _build(
    config_file: str,
    ckpt_path: str | os.PathLike | None,
    device: str | torch.device | None,
    mode: str,
    overrides: Sequence[str],
) -> nn.Module:
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    cfg = _compose_model_config(config_file, overrides)
    # Read the weights first: a missing or corrupt file fails before the model is built.
    state_dict = read_model_state_dict(ckpt_path) if ckpt_path is not None else None
    model = instantiate(cfg.model, _recursive_=True)
    if state_dict is not None:
        load_state_dict_strictly(model, state_dict, config_name=config_file, source=ckpt_path)
    model = model.to(device if device is not None else _default_device())
    return model.eval() if mode == "eval" else model.train()


def build_sam2(
    config_file: str,
    ckpt_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    mode: str = "eval",
    hydra_overrides_extra: Sequence[str] = (),
    apply_postprocessing: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """A `SAM2Base` model (what `SAM2ImagePredictor` wraps) from a config and optional weights.

    Args:
        config_file: official config path (`configs/sam2.1/sam2.1_hiera_b+.yaml`) or short
            name (`sam2.1_hiera_b+`).
        ckpt_path: a `{"model": state_dict}` file, loaded strictly; None keeps random weights.
        device: default cuda when available, else cpu.
        mode: "eval" or "train".
        hydra_overrides_extra: further Hydra overrides (`++model.image_size=512`).
        apply_postprocessing: turn on the dynamic multimask fallback used at inference.
        **kwargs: accepted for compatibility with the official signature and ignored.
    """
    overrides = list(hydra_overrides_extra) + (_DYNAMIC_MULTIMASK if apply_postprocessing else [])
    return _build(config_file, ckpt_path, device, mode, overrides)


def build_sam2_video_predictor(
    config_file: str,
    ckpt_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    mode: str = "eval",
    hydra_overrides_extra: Sequence[str] = (),
    apply_postprocessing: bool = True,
    vos_optimized: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """A `SAM2VideoPredictor` from a config and optional weights (arguments as `build_sam2`).

    Args:
        vos_optimized: build `SAM2VideoPredictorVOS`, which compiles its components.
    """
    if vos_optimized:
        overrides = [
            "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictorVOS",
            "++model.compile_image_encoder=True",
        ]
    else:
        overrides = ["++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor"]
    overrides += list(hydra_overrides_extra)
    if apply_postprocessing:
        overrides += _DYNAMIC_MULTIMASK + _VIDEO_POSTPROCESSING
    return _build(config_file, ckpt_path, device, mode, overrides)


def resolve_pretrained(model_id_or_path: str | os.PathLike) -> tuple[str, str]:
    """`(config name, checkpoint path)` for a local checkpoint file or a folder holding one.

    The config comes from the file name when it is an official one (`sam2.1_hiera_tiny.pt`),
    otherwise from the weights' shapes.

    Raises:
        ValueError: for a hub id or anything that is not a local checkpoint.
    """
    path = Path(model_id_or_path)
    if str(model_id_or_path) in HF_MODEL_ID_TO_FILENAMES:
        resolve_config_name(str(model_id_or_path))  # raises with download instructions
    if path.is_dir():
        candidates = sorted(path.glob("*.pt"))
        if len(candidates) != 1:
            raise ValueError(f"expected exactly one .pt checkpoint in folder {str(path)!r}, found {len(candidates)}")
        path = candidates[0]
    if not path.is_file():
        raise ValueError(
            f"{str(model_id_or_path)!r} is neither a local checkpoint file nor a folder holding one; "
            "this package loads local files only (no hub downloads)"
        )
    for config, ckpt_name in HF_MODEL_ID_TO_FILENAMES.values():
        if path.name == ckpt_name:
            return config, str(path)
    guess = guess_model_config(read_model_state_dict(path))
    if guess is None:
        raise ValueError(
            f"cannot tell which model {str(path)!r} holds from its name or shapes; call "
            "build_sam2(config_file, ckpt_path) with its config"
        )
    return resolve_config_name(guess), str(path)


def build_sam2_hf(model_id: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """`build_sam2` from a local checkpoint file or folder (see `resolve_pretrained`)."""
    config_name, ckpt_path = resolve_pretrained(model_id)
    return build_sam2(config_file=config_name, ckpt_path=ckpt_path, **kwargs)


def build_sam2_video_predictor_hf(model_id: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """`build_sam2_video_predictor` from a local checkpoint file or folder."""
    config_name, ckpt_path = resolve_pretrained(model_id)
    return build_sam2_video_predictor(config_file=config_name, ckpt_path=ckpt_path, **kwargs)
