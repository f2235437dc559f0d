"""Interactive image segmentation: box and click prompts, simulated corrections, mIoU and NoC.

Per object: the IoU for its bounding box; the IoU after a single click at its most interior
point; then correction clicks, each at the centre of the largest error region, up to
`max_clicks` (20), feeding the previous low-res logits back as a mask prompt. From the IoU after
each click come `iou_<n>_clicks` and NoC@85 / NoC@90 (clicks needed, `max_clicks` if never).

    result = evaluate_image_dataset(model, ImageFolderRawDataset(img_folder, gt_folder))
    result.summary["iou_1_click"], result.summary["noc_90"]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from sam2.sam2_image_predictor import SAM2ImagePredictor
from training.evaluation.clicks import NOC_MAX_CLICKS, Click, clicks_to_reach, correction_click, first_click, mask_box
from training.evaluation.metrics import mask_iou
from training.evaluation.overlays import OverlaySample
from training.evaluation.results import EvalResult, gather_rows, summarize_image_rows
from training.evaluation.samples import EvalClip, iter_raw_dataset, rank_and_world

NOC_THRESHOLDS = (0.85, 0.90)


def click_session(
    predictor: SAM2ImagePredictor,
    gt: np.ndarray,
    *,
    max_clicks: int,
    stop_at_iou: float | None = None,
    min_clicks: int = 1,
    feed_previous_mask: bool = True,
) -> tuple[list[float], list[Click], np.ndarray]:
    """Simulated clicking on one object of the image set in `predictor`.

    The first click asks for three masks and keeps the one with the best predicted IoU (a
    single click is ambiguous); later clicks ask for one mask, given all clicks so far.
    Stops after `max_clicks`, or once `min_clicks` are done and the IoU reaches `stop_at_iou`.

    Returns:
        (IoU after each click, the clicks, `[H, W]` bool prediction after the first click).
    """
    clicks = [first_click(gt)]
    ious: list[float] = []
    mask_input = None
    first_prediction = None
    while True:
        masks, scores, low_res = predictor.predict(
            point_coords=np.array([[c.x, c.y] for c in clicks], dtype=np.float32),
            point_labels=np.array([c.label for c in clicks], dtype=np.int32),
            mask_input=mask_input if feed_previous_mask else None,
            multimask_output=len(clicks) == 1,
        )
        best = int(np.argmax(scores)) if len(clicks) == 1 else 0
        prediction = masks[best] > 0
        mask_input = low_res[best][None]
        if first_prediction is None:
            first_prediction = prediction
        ious.append(mask_iou(gt, prediction))
        reached = stop_at_iou is not None and ious[-1] >= stop_at_iou
        if len(clicks) >= max_clicks or (len(clicks) >= min_clicks and reached):
            return ious, clicks, first_prediction
        click = correction_click(gt, prediction)
        if click is None:  # perfect: more clicks would change nothing
            ious.extend([ious[-1]] * (max_clicks - len(ious)))
            return ious, clicks, first_prediction
        clicks.append(click)


def evaluate_image_object(
    predictor: SAM2ImagePredictor,
    gt: np.ndarray,
    *,
    correction_clicks: int = 4,
    max_clicks: int = NOC_MAX_CLICKS,
    noc_thresholds: Sequence[float] = NOC_THRESHOLDS,
    feed_previous_mask: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of one `[H, W]` object on the image set in `predictor`, and what to draw.

    Returns:
        (row with `iou_box`, `iou_1_click`, `iou_<1 + correction_clicks>_clicks`,
        `noc_<85>`..., prompts and first-click/box predictions for the overlay).
    """
    box = mask_box(gt)
    box_masks, _, _ = predictor.predict(box=np.array(box, dtype=np.float32), multimask_output=False)
    box_prediction = box_masks[0] > 0
    total = 1 + correction_clicks
    ious, clicks, click_prediction = click_session(
        predictor,
        gt,
        max_clicks=max(max_clicks, total),
        stop_at_iou=max(noc_thresholds) if noc_thresholds else None,
        min_clicks=total,
        feed_previous_mask=feed_previous_mask,
    )
    row: dict[str, Any] = {"iou_box": mask_iou(gt, box_prediction), "iou_1_click": ious[0]}
    if correction_clicks > 0:
        row[f"iou_{total}_clicks"] = ious[total - 1]
    for threshold in noc_thresholds:
        row[f"noc_{round(threshold * 100)}"] = clicks_to_reach(ious, threshold, max_clicks=max_clicks)
    drawn = {"box": box, "click": clicks[0], "box_prediction": box_prediction, "click_prediction": click_prediction}
    return row, drawn


def _image_overlay(clip: EvalClip, image: np.ndarray, drawn: list[dict[str, Any]]) -> OverlaySample:
    """Two rows: the box prompt and its masks, then the first click and its masks."""
    box_pred = np.stack([d["box_prediction"] for d in drawn])
    click_pred = np.stack([d["click_prediction"] for d in drawn])
    return OverlaySample(
        name=clip.name,
        frames=[image, image],
        frame_indices=[0, 0],
        gt=np.stack([clip.gt_masks[0], clip.gt_masks[0]]),
        pred=np.stack([box_pred, click_pred]),
        clicks=[[d["click"]] for d in drawn],
        boxes=[d["box"] for d in drawn],
    )


def evaluate_image_clip(
    predictor: SAM2ImagePredictor, clip: EvalClip, *, keep_prediction: bool = False, **object_kwargs: Any
) -> tuple[list[dict[str, Any]], OverlaySample | None]:
    """Every object of the clip's first frame: (object rows, overlay). Keywords go to
    `evaluate_image_object`; the predictor's model must be in eval mode."""
    image = clip.rgb_frame(0)
    predictor.set_image(image)
    rows, drawn = [], []
    for o, obj_id in enumerate(clip.object_ids):
        if not clip.gt_masks[0, o].any():
            continue
        row, picture = evaluate_image_object(predictor, clip.gt_masks[0, o], **object_kwargs)
        rows.append({"image": clip.name, "object_id": obj_id, **row})
        drawn.append(picture)
    return rows, _image_overlay(clip, image, drawn) if keep_prediction and drawn else None


def evaluate_image_clips(
    model,
    clips: Iterable[EvalClip],
    *,
    keep_predictions: int = 0,
    predictor_kwargs: dict[str, Any] | None = None,
    **object_kwargs: Any,
) -> EvalResult:
    """Box / click metrics for every object of every clip's first frame (this rank's share);
    rows of all ranks are gathered. Keywords go to `evaluate_image_object`."""
    was_training = model.training
    model.eval()
    predictor = SAM2ImagePredictor(model, **(predictor_kwargs or {}))
    rows: list[dict[str, Any]] = []
    samples = []
    try:
        with torch.inference_mode():
            for clip in clips:
                keep = len(samples) < keep_predictions
                clip_rows, sample = evaluate_image_clip(predictor, clip, keep_prediction=keep, **object_kwargs)
                rows.extend(clip_rows)
                samples.extend([sample] if sample is not None else [])
    finally:
        model.train(was_training)
    objects, images, summary = summarize_image_rows(gather_rows(rows))
    return EvalResult(kind="image", objects=objects, items=images, summary=summary, samples=samples)


def evaluate_image_dataset(
    model,
    dataset,
    *,
    max_images: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    **kwargs: Any,
) -> EvalResult:
    """Interactive metrics of `model` on a raw image dataset (e.g. `ImageFolderRawDataset`);
    for a video dataset, the first frame of each video. Keywords go to `evaluate_image_clips`."""
    rank, world_size = rank_and_world(rank, world_size)
    clips = iter_raw_dataset(dataset, rank=rank, world_size=world_size, max_items=max_images, max_frames=1)
    return evaluate_image_clips(model, clips, **kwargs)
