"""Semi-supervised video object segmentation: prompt the first frame, track, score J and F.

The model is any `SAM2Base` (a built model, a `SAM2VideoPredictor`, or `SAM2Train` during
training): clips are tracked with `track_step`, all objects of a clip as one batch, the way the
video predictor tracks them (same prompt scaling, same memory of the prompted frame, same
low-res output upsampling: masks equal to `propagate_in_video`'s), without its optional
post-processing (`fill_hole_area`, `non_overlap_masks`).

    result = evaluate_video_dataset(model, PNGRawDataset(img_folder, gt_folder), prompt="mask")
    result.summary["J&F"], result.objects  # DataFrame, one row per (video, object)
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sam2.utils.video_frames import load_video_frames
from training.evaluation.clicks import first_click, mask_box
from training.evaluation.metrics import DAVIS_BOUND_TH, boundary_f_measure, frame_statistics, region_iou
from training.evaluation.overlays import OverlaySample
from training.evaluation.results import EvalResult, gather_rows, summarize_video_rows
from training.evaluation.samples import EvalClip, iter_raw_dataset, rank_and_world

VIDEO_PROMPTS = ("mask", "box", "click")


def first_frame_prompts(
    gt_first: np.ndarray, prompt: str, image_size: int, device: torch.device
) -> tuple[dict[str, Tensor] | None, Tensor | None]:
    """(point_inputs, mask_inputs) for `track_step` from the first frame's `[O, H, W]` masks.

    Points are scaled from pixels to the model's `image_size` square, as the video predictor
    scales user clicks; boxes become two corner points labelled 2 and 3.
    """
    if prompt not in VIDEO_PROMPTS:
        raise ValueError(f"prompt must be one of {VIDEO_PROMPTS}, got {prompt!r}")
    height, width = gt_first.shape[-2:]
    if prompt == "mask":
        masks = torch.from_numpy(gt_first).to(device)[:, None].float()
        size = (image_size, image_size)
        resized = F.interpolate(masks, size=size, mode="bilinear", align_corners=False, antialias=True)
        return None, (resized >= 0.5).float()
    if prompt == "box":
        coords = [[b[:2], b[2:]] for b in map(mask_box, gt_first)]
        labels = [[2, 3]] * len(coords)
    else:
        clicks = [first_click(mask) for mask in gt_first]
        coords = [[[float(c.x), float(c.y)]] for c in clicks]
        labels = [[c.label] for c in clicks]
    scale = torch.tensor([image_size / width, image_size / height], device=device)
    points = torch.tensor(coords, dtype=torch.float32, device=device) * scale
    return {"point_coords": points, "point_labels": torch.tensor(labels, dtype=torch.int32, device=device)}, None


def _frame_features(model, image: Tensor, num_objects: int) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
    """Backbone tokens of one `[3, S, S]` frame, repeated for the objects of the batch."""
    backbone_out = model.forward_image(image[None])
    _, feats, pos, sizes = model._prepare_backbone_features(backbone_out)
    feats = [f.expand(-1, num_objects, -1) for f in feats]
    pos = [p.expand(-1, num_objects, -1) for p in pos]
    return feats, pos, sizes


def _encode_prompted_memory(model, out: dict[str, Any], feats: list[Tensor], sizes: list[tuple[int, int]]) -> None:
    """Memory of the prompted frame, written the way the video predictor writes it.

    The predictor encodes a prompted frame's memory when propagation starts, from its low-res
    mask upsampled to the model's input size and treated as user input (`is_mask_from_pts`),
    not from the decoder's high-res output; published VOS numbers come from that path.
    """
    high_res = F.interpolate(
        out["pred_masks"], size=(model.image_size, model.image_size), mode="bilinear", align_corners=False
    )
    # SAM2Train keeps the score per prediction step only; the last step is the final one.
    scores = out["object_score_logits"] if "object_score_logits" in out else out["multistep_object_score_logits"][-1]
    out["maskmem_features"], out["maskmem_pos_enc"] = model._encode_new_memory(
        current_vision_feats=feats,
        feat_sizes=sizes,
        pred_masks_high_res=high_res,
        object_score_logits=scores,
        is_mask_from_pts=True,
    )


def _model_inputs(model, clip: EvalClip, device: torch.device) -> Tensor:
    if isinstance(clip.frames, Tensor):
        return clip.frames.to(device)
    images, _, _ = load_video_frames(
        list(clip.frames), model.image_size, offload_video_to_cpu=False, compute_device=device
    )
    return images


@torch.inference_mode()
def track_clip(model, clip: EvalClip, *, prompt: str = "mask", autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """`[T, O, H, W]` bool predicted masks of the clip's objects, prompted on frame 0."""
    device = model.device
    images = _model_inputs(model, clip, device)
    num_frames, num_objects = clip.num_frames, len(clip.object_ids)
    point_inputs, mask_inputs = first_frame_prompts(clip.gt_masks[0], prompt, model.image_size, device)
    output_dict: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    predictions = np.zeros((num_frames, num_objects, *clip.size), dtype=bool)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with autocast:
        for t in range(num_frames):
            feats, pos, sizes = _frame_features(model, images[t], num_objects)
            out = model.track_step(
                frame_idx=t,
                is_init_cond_frame=t == 0,
                current_vision_feats=feats,
                current_vision_pos_embeds=pos,
                feat_sizes=sizes,
                point_inputs=point_inputs if t == 0 else None,
                mask_inputs=mask_inputs if t == 0 else None,
                output_dict=output_dict,
                num_frames=num_frames,
                run_mem_encoder=t > 0,
            )
            if t == 0:
                _encode_prompted_memory(model, out, feats, sizes)
            logits = F.interpolate(out["pred_masks"].float(), size=clip.size, mode="bilinear", align_corners=False)
            predictions[t] = (logits[:, 0] > 0).cpu().numpy()
            # Later frames read only the memory, pointers and low-res masks: drop full-size maps.
            for key in [k for k in out if k.startswith("multistep_") or k == "pred_masks_high_res"]:
                del out[key]
            output_dict["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = out
    return predictions


def video_overlay_sample(clip: EvalClip, predictions: np.ndarray, prompt: str) -> OverlaySample:
    """First, middle and last frame of a tracked clip, with its first-frame prompts."""
    shown = sorted({0, clip.num_frames // 2, clip.num_frames - 1})
    first = clip.gt_masks[0]
    return OverlaySample(
        name=clip.name,
        frames=[clip.rgb_frame(t) for t in shown],
        frame_indices=shown,
        gt=clip.gt_masks[shown],
        pred=predictions[shown],
        clicks=[[first_click(mask)] for mask in first] if prompt == "click" else [],
        boxes=[mask_box(mask) for mask in first] if prompt == "box" else [],
        mask_prompt=prompt == "mask",
    )


def scored_frames(num_frames: int, *, skip_first_and_last: bool = True) -> list[int]:
    """Frames that count: DAVIS leaves out the prompted first frame and the last frame.

    Clips too short for that keep what they can (frame 1 alone for T = 2, frame 0 for T = 1).
    """
    if num_frames == 1:
        return [0]
    if skip_first_and_last and num_frames > 2:
        return list(range(1, num_frames - 1))
    return list(range(1, num_frames))


def score_clip(
    clip: EvalClip, predictions: np.ndarray, *, skip_first_and_last: bool = True, bound_th: float = DAVIS_BOUND_TH
) -> list[dict[str, Any]]:
    """One row per object: DAVIS J/F mean, recall and decay over the scored frames."""
    frames = scored_frames(clip.num_frames, skip_first_and_last=skip_first_and_last)
    rows = []
    for o, obj_id in enumerate(clip.object_ids):
        j = [region_iou(clip.gt_masks[t, o], predictions[t, o]) for t in frames]
        f = [boundary_f_measure(clip.gt_masks[t, o], predictions[t, o], bound_th=bound_th) for t in frames]
        j_stats, f_stats = frame_statistics(j), frame_statistics(f)
        rows.append(
            {
                "video": clip.name,
                "object_id": obj_id,
                "num_frames": len(frames),
                "J&F": (j_stats["mean"] + f_stats["mean"]) / 2,
                "J": j_stats["mean"],
                "F": f_stats["mean"],
                "J_recall": j_stats["recall"],
                "F_recall": f_stats["recall"],
                "J_decay": j_stats["decay"],
                "F_decay": f_stats["decay"],
            }
        )
    return rows


def evaluate_video_clip(
    model,
    clip: EvalClip,
    *,
    prompt: str = "mask",
    skip_first_and_last: bool = True,
    bound_th: float = DAVIS_BOUND_TH,
    autocast_dtype: torch.dtype | None = None,
    keep_prediction: bool = False,
) -> tuple[list[dict[str, Any]], OverlaySample | None]:
    """Track one clip with `model` (already in eval mode) and score it: (object rows, overlay).

    A clip without objects on its first frame has nothing to track and gives no rows.
    """
    if not clip.object_ids:
        return [], None
    predictions = track_clip(model, clip, prompt=prompt, autocast_dtype=autocast_dtype)
    rows = score_clip(clip, predictions, skip_first_and_last=skip_first_and_last, bound_th=bound_th)
    return rows, video_overlay_sample(clip, predictions, prompt) if keep_prediction else None


def evaluate_video_clips(model, clips: Iterable[EvalClip], *, keep_predictions: int = 0, **kwargs: Any) -> EvalResult:
    """Track and score clips (this process's share); rows of all ranks are gathered.

    keep_predictions: keep overlays (`OverlaySample`) of this rank's first this many clips in
    `result.samples`. Other keywords go to `evaluate_video_clip`.
    """
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    samples = []
    try:
        for clip in clips:
            keep = len(samples) < keep_predictions
            clip_rows, sample = evaluate_video_clip(model, clip, keep_prediction=keep, **kwargs)
            rows.extend(clip_rows)
            samples.extend([sample] if sample is not None else [])
    finally:
        model.train(was_training)
    objects, videos, summary = summarize_video_rows(gather_rows(rows))
    summary["prompt"] = kwargs.get("prompt", "mask")
    return EvalResult(kind="video", objects=objects, items=videos, summary=summary, samples=samples)


def evaluate_video_dataset(
    model,
    dataset,
    *,
    prompt: str = "mask",
    max_videos: int | None = None,
    max_frames: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    **kwargs: Any,
) -> EvalResult:
    """J&F of `model` on a raw video dataset (e.g. `PNGRawDataset`), videos split over ranks.

    rank / world_size default to the initialised process group (or 0 / 1).
    Other keywords go to `evaluate_video_clips`.
    """
    rank, world_size = rank_and_world(rank, world_size)
    clips = iter_raw_dataset(dataset, rank=rank, world_size=world_size, max_items=max_videos, max_frames=max_frames)
    return evaluate_video_clips(model, clips, prompt=prompt, **kwargs)
