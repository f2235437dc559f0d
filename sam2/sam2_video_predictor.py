"""Interactive video segmentation: prompt objects on some frames, then track them through the video.

Typical use (the official API):

    state = predictor.init_state("video_frames/")
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[210, 350]], labels=[1])
    for frame_idx, obj_ids, masks in predictor.propagate_in_video(state):
        ...  # masks: [num_objects, 1, H, W] logits at the video's resolution

The session's bookkeeping lives in `sam2.video.session`, the per-frame model calls in
`sam2.video.frame_inference`; this module holds the user-facing steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sam2.modeling.sam2_base import SAM2Base
from sam2.utils.misc import concat_points, load_video_frames
from sam2.video.compiled import CompiledComponentsMixin
from sam2.video.frame_inference import FrameInferenceMixin
from sam2.video.session import COND, NON_COND, InferenceState, ObjectTrack, storage_key

# Mask logits fed back to the decoder with new clicks are clamped to avoid rare numerical issues.
PREV_LOGIT_LIMIT = 32.0
FrameResult = tuple[int, list[Any], Tensor]


class SAM2VideoPredictor(FrameInferenceMixin, SAM2Base):
    """SAM 2 with the video-session API on top of the frame-by-frame tracker.

    Args:
        fill_hole_area: fill background holes of at most this many low-res pixels in every
            predicted mask (0: off).
        non_overlap_masks: in the returned masks, each pixel belongs to at most one object.
        clear_non_cond_mem_around_input: after a correction on a frame, forget that object's
            tracked memories within `num_maskmem` (strided) frames of it.
        add_all_frames_to_correct_as_cond: frames receiving corrections become prompted
            (conditioning) frames, instead of only the frames prompted before tracking.
        **kwargs: `SAM2Base` arguments.

    Memories are stored in bfloat16 when the model runs under autocast (as the official
    predictor does, halving their size), otherwise in the model's own precision.
    """

    def __init__(
        self,
        fill_hole_area: int = 0,
        non_overlap_masks: bool = False,
        clear_non_cond_mem_around_input: bool = False,
        add_all_frames_to_correct_as_cond: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fill_hole_area = fill_hole_area
        self.non_overlap_masks = non_overlap_masks
        self.clear_non_cond_mem_around_input = clear_non_cond_mem_around_input
        self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs: Any) -> SAM2VideoPredictor:
        """A video predictor from a local checkpoint file or folder; no downloads (a hub id
        raises with instructions). Keywords go to `build_sam2_video_predictor`."""
        from sam2.build_sam import build_sam2_video_predictor_hf

        return build_sam2_video_predictor_hf(model_id, **kwargs)

    # ------------------------------------------------------------------ session
    @torch.inference_mode()
    def init_state(
        self,
        video_path: Any,
        offload_video_to_cpu: bool = False,
        offload_state_to_cpu: bool = False,
        async_loading_frames: bool = False,
    ) -> InferenceState:
        """Start a session on a video: a folder of JPEG frames, or frames in memory (a list of
        HxWx3 uint8 arrays / PIL images, or a `[T, H, W, 3]` uint8 array)."""
        device = self.device
        images, video_height, video_width = load_video_frames(
            video_path=video_path,
            image_size=self.image_size,
            offload_video_to_cpu=offload_video_to_cpu,
            async_loading_frames=async_loading_frames,
            compute_device=device,
        )
        state = InferenceState(
            images=images,
            num_frames=len(images),
            video_height=video_height,
            video_width=video_width,
            device=device,
            storage_device=torch.device("cpu") if offload_state_to_cpu else device,
            offload_video_to_cpu=offload_video_to_cpu,
            offload_state_to_cpu=offload_state_to_cpu,
        )
        # Embedding the first frame now makes the first click on it fast.
        self._get_image_feature(state, frame_idx=0, batch_size=1)
        return state

    @torch.inference_mode()
    def reset_state(self, inference_state: InferenceState) -> None:
        """Remove every object, prompt and result of the session."""
        inference_state.reset()

    # ------------------------------------------------------------------ prompts
    @torch.inference_mode()
    def add_new_points_or_box(
        self,
        inference_state: InferenceState,
        frame_idx: int,
        obj_id: Any,
        points: Tensor | np.ndarray | Sequence | None = None,
        labels: Tensor | np.ndarray | Sequence | None = None,
        clear_old_points: bool = True,
        normalize_coords: bool = True,
        box: Tensor | np.ndarray | Sequence | None = None,
    ) -> FrameResult:
        """Click on (and/or box) object `obj_id` on a frame.

        Args:
            points: `[N, 2]` clicks as (x, y), pixels of the video unless `normalize_coords=False`
                (then already relative, in [0, 1]).
            labels: `[N]` 1 foreground, 0 background.
            clear_old_points: replace this frame's earlier clicks instead of adding to them.
            box: `[4]` (x0, y0, x1, y1); only together with `clear_old_points=True`.

        Returns:
            `(frame_idx, obj_ids, masks [num_objects, 1, H, W])`, logits at video resolution.
        """
        if (points is None) != (labels is None):
            raise ValueError(
                "points and labels must be given together (one label per point: 1 foreground, 0 background)"
            )
        if points is None and box is None:
            raise ValueError("give points (with labels) or a box")
        if box is not None and not clear_old_points:
            raise ValueError(
                "a box must come before any click on the frame; call with clear_old_points=True to "
                "replace the frame's clicks by the box (plus any points given with it)"
            )
        inference_state.check_frame_index(frame_idx)
        obj = inference_state.objects[inference_state.object_index(obj_id)]
        coords, point_labels = _points_as_batch(points, labels, box)
        if normalize_coords:
            coords = coords / torch.tensor(
                [inference_state.video_width, inference_state.video_height],
                dtype=coords.dtype,
            )
        coords = (coords * self.image_size).to(inference_state.device)
        point_labels = point_labels.to(inference_state.device)
        previous = None if clear_old_points else obj.point_inputs.get(frame_idx)
        point_inputs = concat_points(previous, coords, point_labels)
        obj.point_inputs[frame_idx] = point_inputs
        obj.mask_inputs.pop(frame_idx, None)
        return self._run_prompted_frame(inference_state, obj, frame_idx, point_inputs=point_inputs)

    def add_new_points(self, *args: Any, **kwargs: Any) -> FrameResult:
        """Deprecated name of `add_new_points_or_box`."""
        return self.add_new_points_or_box(*args, **kwargs)

    @torch.inference_mode()
    def add_new_mask(
        self,
        inference_state: InferenceState,
        frame_idx: int,
        obj_id: Any,
        mask: Tensor | np.ndarray,
    ) -> FrameResult:
        """Give object `obj_id` a mask `[H, W]` (bool/0-1, any size) on a frame.

        Returns `(frame_idx, obj_ids, masks [num_objects, 1, H, W])` like `add_new_points_or_box`.
        """
        mask = torch.as_tensor(mask)
        if mask.dim() != 2:
            raise ValueError(f"add_new_mask takes one [H, W] mask, got shape {tuple(mask.shape)}")
        inference_state.check_frame_index(frame_idx)
        obj = inference_state.objects[inference_state.object_index(obj_id)]
        mask_inputs = mask.bool()[None, None].float().to(inference_state.device)
        if mask_inputs.shape[-2:] != (self.image_size, self.image_size):
            resized = F.interpolate(
                mask_inputs,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            mask_inputs = (resized >= 0.5).float()
        obj.mask_inputs[frame_idx] = mask_inputs
        obj.point_inputs.pop(frame_idx, None)
        return self._run_prompted_frame(inference_state, obj, frame_idx, mask_inputs=mask_inputs)

    def _run_prompted_frame(
        self,
        state: InferenceState,
        obj: ObjectTrack,
        frame_idx: int,
        *,
        point_inputs: dict[str, Tensor] | None = None,
        mask_inputs: Tensor | None = None,
    ) -> FrameResult:
        """Segment one object on a frame it was just prompted on; the result waits in `pending`.

        A frame the object was never tracked on is an initial conditioning frame (segmented like
        SAM, without memory); on a tracked frame the prompt corrects the tracked mask. Memory is
        encoded only when propagation starts, once all objects are final on the frame.
        """
        tracked = obj.frames_tracked.get(frame_idx)
        is_init_cond_frame = tracked is None
        is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
        key = storage_key(is_cond)
        prev_logits = None
        if point_inputs is not None:
            previous = obj.latest_output(frame_idx, pending_key=key)
            if previous is not None and previous["pred_masks"] is not None:
                prev_logits = previous["pred_masks"].to(state.device, non_blocking=True)
                prev_logits = prev_logits.clamp(-PREV_LOGIT_LIMIT, PREV_LOGIT_LIMIT)
        current_out, _ = self._run_single_frame_inference(
            state,
            obj.outputs,
            frame_idx,
            batch_size=1,
            is_init_cond_frame=is_init_cond_frame,
            point_inputs=point_inputs,
            mask_inputs=mask_inputs,
            reverse=False if tracked is None else tracked["reverse"],
            run_mem_encoder=False,
            prev_sam_mask_logits=prev_logits,
        )
        obj.pending[key][frame_idx] = current_out
        masks = self._consolidate_temp_output_across_obj(
            state, frame_idx, is_cond=is_cond, consolidate_at_video_res=True
        )
        _, video_res_masks = self._get_orig_video_res_output(state, masks)
        return frame_idx, state.obj_ids, video_res_masks

    # ------------------------------------------------------------------ propagation
    @torch.inference_mode()
    def propagate_in_video_preflight(self, inference_state: InferenceState) -> None:
        """Move the frames just prompted into the memory bank, encoding their memories."""
        if inference_state.num_objects == 0:
            raise RuntimeError("no object has prompts yet; call add_new_points_or_box or add_new_mask first")
        for obj_idx, obj in enumerate(inference_state.objects):
            for key in (NON_COND, COND):
                for frame_idx, out in obj.pending[key].items():
                    if out["maskmem_features"] is None:
                        high_res_masks = F.interpolate(
                            out["pred_masks"].to(inference_state.device),
                            size=(self.image_size, self.image_size),
                            mode="bilinear",
                            align_corners=False,
                        )
                        out["maskmem_features"], out["maskmem_pos_enc"] = self._run_memory_encoder(
                            inference_state,
                            frame_idx,
                            batch_size=1,
                            high_res_masks=high_res_masks,
                            object_score_logits=out["object_score_logits"],
                            is_mask_from_pts=True,  # frames the user interacted with
                        )
                    obj.outputs[key][frame_idx] = out
                    if self.clear_non_cond_mem_around_input:
                        self._clear_obj_non_cond_mem_around_input(inference_state, frame_idx, obj_idx)
                obj.pending[key].clear()
            if not obj.outputs[COND]:
                raise RuntimeError(
                    f"object id {obj.obj_id} has no prompted frame; add points, a box or a mask for it, "
                    "or remove it with remove_object"
                )
            # A frame that became prompted is no longer a tracked frame.
            for frame_idx in obj.outputs[COND]:
                obj.outputs[NON_COND].pop(frame_idx, None)

    @torch.inference_mode()
    def propagate_in_video(
        self,
        inference_state: InferenceState,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
        reverse: bool = False,
    ) -> Iterator[FrameResult]:
        """Track every object frame by frame, yielding `(frame_idx, obj_ids, masks [N, 1, H, W])`.

        Starts at the earliest prompted frame unless `start_frame_idx` is given, and runs for
        `max_frame_num_to_track` frames after it (default: to the end, or to frame 0 in reverse).
        """
        self.propagate_in_video_preflight(inference_state)
        state = inference_state
        if start_frame_idx is None:
            start_frame_idx = min(t for obj in state.objects for t in obj.outputs[COND])
        if max_frame_num_to_track is None:
            max_frame_num_to_track = state.num_frames
        if reverse:
            end_frame_idx = max(start_frame_idx - max_frame_num_to_track, 0)
            processing_order = range(start_frame_idx, end_frame_idx - 1, -1) if start_frame_idx > 0 else range(0)
        else:
            end_frame_idx = min(start_frame_idx + max_frame_num_to_track, state.num_frames - 1)
            processing_order = range(start_frame_idx, end_frame_idx + 1)
        for frame_idx in tqdm(processing_order, desc="propagate in video"):
            pred_masks = [
                self._track_object_on_frame(state, obj_idx, frame_idx, reverse) for obj_idx in range(state.num_objects)
            ]
            _, video_res_masks = self._get_orig_video_res_output(state, torch.cat(pred_masks, dim=0))
            yield frame_idx, state.obj_ids, video_res_masks

    def _track_object_on_frame(self, state: InferenceState, obj_idx: int, frame_idx: int, reverse: bool) -> Tensor:
        """One object's low-res mask logits `[1, 1, h, w]` on a frame during propagation."""
        obj = state.objects[obj_idx]
        prompted_out = obj.outputs[COND].get(frame_idx)
        if prompted_out is not None:
            # Prompted frames keep their prompted result (clicks differ per object, so they are
            # not re-run as a batch).
            pred_masks = prompted_out["pred_masks"].to(state.device, non_blocking=True)
            if self.clear_non_cond_mem_around_input:
                self._clear_obj_non_cond_mem_around_input(state, frame_idx, obj_idx)
        else:
            current_out, pred_masks = self._run_single_frame_inference(
                state,
                obj.outputs,
                frame_idx,
                batch_size=1,
                is_init_cond_frame=False,
                point_inputs=None,
                mask_inputs=None,
                reverse=reverse,
                run_mem_encoder=True,
            )
            obj.outputs[NON_COND][frame_idx] = current_out
        obj.frames_tracked[frame_idx] = {"reverse": reverse}
        return pred_masks

    # ------------------------------------------------------------------ editing
    @torch.inference_mode()
    def clear_all_prompts_in_frame(
        self,
        inference_state: InferenceState,
        frame_idx: int,
        obj_id: Any,
        need_output: bool = True,
    ) -> FrameResult | None:
        """Remove object `obj_id`'s prompts on a frame (its result there becomes a tracked one)."""
        obj = inference_state.objects[inference_state.object_index(obj_id)]
        obj.clear_frame_prompts(frame_idx)
        if not need_output:
            return None
        return (
            frame_idx,
            inference_state.obj_ids,
            self._frame_masks_after_edit(inference_state, frame_idx),
        )

    def _frame_masks_after_edit(self, state: InferenceState, frame_idx: int) -> Tensor:
        """All objects' current masks `[N, 1, H, W]` on a frame at video resolution."""
        is_cond = any(frame_idx in obj.pending[COND] for obj in state.objects)
        masks = self._consolidate_temp_output_across_obj(
            state, frame_idx, is_cond=is_cond, consolidate_at_video_res=True
        )
        return self._get_orig_video_res_output(state, masks)[1]

    @torch.inference_mode()
    def remove_object(
        self,
        inference_state: InferenceState,
        obj_id: Any,
        strict: bool = False,
        need_output: bool = True,
    ) -> tuple[list[Any], list[tuple[int, Tensor]]]:
        """Remove an object from the session.

        Returns the remaining object ids and, with `need_output`, `(frame_idx, masks)` for each
        frame the object had prompts on (other objects' masks there may change).
        """
        obj_idx = inference_state.find_object(obj_id)
        if obj_idx is None:
            if strict:
                raise RuntimeError(
                    f"cannot remove object id {obj_id}: not in the session (ids: {inference_state.obj_ids})"
                )
            return inference_state.obj_ids, []
        if inference_state.num_objects == 1:
            self.reset_state(inference_state)
            return inference_state.obj_ids, []
        obj = inference_state.objects[obj_idx]
        prompted_frames = sorted(set(obj.point_inputs) | set(obj.mask_inputs))
        for frame_idx in prompted_frames:
            obj.clear_frame_prompts(frame_idx)
        inference_state.remove_object(obj_idx)
        updated = []
        if need_output:
            updated = [(t, self._frame_masks_after_edit(inference_state, t)) for t in prompted_frames]
        return inference_state.obj_ids, updated

    def _clear_obj_non_cond_mem_around_input(
        self, inference_state: InferenceState, frame_idx: int, obj_idx: int
    ) -> None:
        """Forget one object's tracked memories near a corrected frame: they may contradict it.

        The corrected frame's own output stays: when corrections are not made conditioning frames,
        it is the only place the correction lives.
        """
        reach = self.memory_temporal_stride_for_eval * self.num_maskmem
        tracked = inference_state.objects[obj_idx].outputs[NON_COND]
        for t in range(frame_idx - reach, frame_idx + reach + 1):
            if t != frame_idx:
                tracked.pop(t, None)


class SAM2VideoPredictorVOS(CompiledComponentsMixin, SAM2VideoPredictor):
    """`SAM2VideoPredictor` with its per-frame components compiled by `torch.compile`, for fast
    semi-supervised VOS on GPUs (`build_sam2_video_predictor(..., vos_optimized=True)`)."""


def _points_as_batch(
    points: Tensor | np.ndarray | Sequence | None,
    labels: Tensor | np.ndarray | Sequence | None,
    box: Tensor | np.ndarray | Sequence | None,
) -> tuple[Tensor, Tensor]:
    """Clicks (and a box as two leading corner clicks labelled 2 and 3) as CPU tensors `[1, N, 2]`,
    `[1, N]`."""
    coords = torch.zeros(0, 2) if points is None else torch.as_tensor(points, dtype=torch.float32).cpu()
    point_labels = torch.zeros(0, dtype=torch.int32) if labels is None else torch.as_tensor(labels).int().cpu()
    if coords.dim() == 2:
        coords = coords[None]
    if point_labels.dim() == 1:
        point_labels = point_labels[None]
    if box is not None:
        corners = torch.as_tensor(box, dtype=torch.float32).cpu().reshape(1, 2, 2)
        coords = torch.cat([corners, coords], dim=1)
        point_labels = torch.cat([torch.tensor([[2, 3]], dtype=torch.int32), point_labels], dim=1)
    return coords, point_labels
