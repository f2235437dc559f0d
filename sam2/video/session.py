"""The bookkeeping of one video session: frames, objects, their prompts and their outputs.

A session (`InferenceState`) holds the video and one `ObjectTrack` per object the user prompted.
An object's frame outputs live in the two banks the tracker reads,
`{"cond_frame_outputs": {t: out}, "non_cond_frame_outputs": {t: out}}`: prompted frames and
tracked frames. Outputs of frames the user is still editing wait in `pending`, a bank of the same
shape, until propagation starts and encodes their memories.

Each frame output is a compact dict: `maskmem_features [1, C_mem, h, w]` (None until encoded),
`maskmem_pos_enc` (list, shared by all frames), `pred_masks [1, 1, h, w]` low-res logits,
`obj_ptr [1, C]` and `object_score_logits [1, 1]`.

For code written against the official predictor, `state["num_frames"]`,
`state["output_dict_per_obj"]` and the other official keys read the same information.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

COND = "cond_frame_outputs"
NON_COND = "non_cond_frame_outputs"
FrameOutput = dict[str, Any]
OutputBank = dict[str, dict[int, FrameOutput]]


def empty_bank() -> OutputBank:
    return {COND: {}, NON_COND: {}}


def storage_key(is_cond: bool) -> str:
    return COND if is_cond else NON_COND


@dataclass
class ObjectTrack:
    """Everything the session knows about one object (client id `obj_id`)."""

    obj_id: Any
    point_inputs: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    mask_inputs: dict[int, Tensor] = field(default_factory=dict)
    outputs: OutputBank = field(default_factory=empty_bank)
    pending: OutputBank = field(default_factory=empty_bank)
    # frame index -> {"reverse": direction it was tracked in}
    frames_tracked: dict[int, dict[str, bool]] = field(default_factory=dict)

    def latest_output(self, frame_idx: int, pending_key: str | None = None) -> FrameOutput | None:
        """The newest output on `frame_idx`: the pending one (under `pending_key`, or either key
        when None), else the prompted, else the tracked one."""
        keys = (COND, NON_COND) if pending_key is None else (pending_key,)
        for bank, key in [(self.pending, k) for k in keys] + [
            (self.outputs, COND),
            (self.outputs, NON_COND),
        ]:
            out = bank[key].get(frame_idx)
            if out is not None:
                return out
        return None

    def clear_frame_prompts(self, frame_idx: int) -> None:
        """Drop the prompts on `frame_idx`; its prompted output, if any, becomes a tracked one."""
        self.point_inputs.pop(frame_idx, None)
        self.mask_inputs.pop(frame_idx, None)
        self.pending[COND].pop(frame_idx, None)
        self.pending[NON_COND].pop(frame_idx, None)
        out = self.outputs[COND].pop(frame_idx, None)
        if out is not None:
            self.outputs[NON_COND][frame_idx] = out
            self.frames_tracked.pop(frame_idx, None)

    def clear_results(self) -> None:
        for container in (self.point_inputs, self.mask_inputs, self.frames_tracked):
            container.clear()
        for bank in (self.outputs, self.pending):
            bank[COND].clear()
            bank[NON_COND].clear()


@dataclass
class InferenceState:
    """One video session of `SAM2VideoPredictor` (created by `init_state`).

    `images` is `[T, 3, S, S]` (or a lazy frame loader); `device` runs the model and
    `storage_device` keeps per-frame outputs (the CPU with `offload_state_to_cpu`).
    """

    images: Any
    num_frames: int
    video_height: int
    video_width: int
    device: torch.device
    storage_device: torch.device
    offload_video_to_cpu: bool = False
    offload_state_to_cpu: bool = False
    objects: list[ObjectTrack] = field(default_factory=list)
    # backbone output of the most recently embedded frame: {frame_idx: (image, backbone_out)}
    cached_features: dict[int, tuple[Tensor, dict[str, Any]]] = field(default_factory=dict)
    # values equal on every frame and object, kept once (e.g. "maskmem_pos_enc")
    constants: dict[str, Any] = field(default_factory=dict)

    def check_frame_index(self, frame_idx: int) -> None:
        if not 0 <= frame_idx < self.num_frames:
            raise IndexError(f"frame_idx {frame_idx} is outside the video's frames 0..{self.num_frames - 1}")

    # ------------------------------------------------------------------ objects
    @property
    def obj_ids(self) -> list[Any]:
        return [obj.obj_id for obj in self.objects]

    @property
    def num_objects(self) -> int:
        return len(self.objects)

    def find_object(self, obj_id: Any) -> int | None:
        """Model-side index of client id `obj_id`, or None."""
        for obj_idx, obj in enumerate(self.objects):
            if obj.obj_id == obj_id:
                return obj_idx
        return None

    def object_index(self, obj_id: Any) -> int:
        """Model-side index of `obj_id`, adding the object (also after tracking started) if new."""
        obj_idx = self.find_object(obj_id)
        if obj_idx is None:
            self.objects.append(ObjectTrack(obj_id))
            obj_idx = len(self.objects) - 1
        return obj_idx

    def remove_object(self, obj_idx: int) -> None:
        """Delete an object; later objects move one index down, as their outputs' batch rows do."""
        del self.objects[obj_idx]

    def reset(self) -> None:
        """Forget every object, prompt and output (the video and its cached features stay)."""
        self.objects.clear()

    def clear_tracking_results(self) -> None:
        """Forget prompts and outputs but keep the objects."""
        for obj in self.objects:
            obj.clear_results()

    # ------------------------------------------------------------------ official dict view
    def __getitem__(self, key: str) -> Any:
        per_object = {
            "point_inputs_per_obj": "point_inputs",
            "mask_inputs_per_obj": "mask_inputs",
            "output_dict_per_obj": "outputs",
            "temp_output_dict_per_obj": "pending",
            "frames_tracked_per_obj": "frames_tracked",
        }
        if key in per_object:
            return {obj_idx: getattr(obj, per_object[key]) for obj_idx, obj in enumerate(self.objects)}
        if key == "obj_id_to_idx":
            return OrderedDict((obj.obj_id, obj_idx) for obj_idx, obj in enumerate(self.objects))
        if key == "obj_idx_to_id":
            return OrderedDict(enumerate(self.obj_ids))
        if key in self.__dataclass_fields__ or key == "obj_ids":
            return getattr(self, key)
        raise KeyError(f"{key!r} is not a field of the inference state; fields: {sorted(self.__dataclass_fields__)}")
