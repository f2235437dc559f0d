"""Which stored frames the current frame attends to, and how their memories become tokens.

The tracker keeps one output dict per processed frame in
`output_dict = {"cond_frame_outputs": {t: out}, "non_cond_frame_outputs": {t: out}}`:
conditioning frames carry user prompts, the others were tracked. A frame's memory is built from

- the prompted frames (all of them, or the `max_cond_frames_in_attn` closest in time), all at
  temporal slot 0, and
- up to `num_maskmem - 1` tracked frames just before the current one (just after it when
  tracking in reverse) at slots 1 .. num_maskmem - 1, the most recent frame in the last slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

FrameOutput = Mapping[str, Any]


def select_closest_cond_frames(
    frame_idx: int, cond_frame_outputs: Mapping[int, FrameOutput], max_cond_frame_num: int
) -> tuple[dict[int, FrameOutput], dict[int, FrameOutput]]:
    """Split the prompted frames into those the current frame attends to and the rest.

    With a limit (`max_cond_frame_num != -1`) and more prompted frames than it allows, keep the
    nearest prompted frame before `frame_idx`, the nearest at or after it, then the others by
    temporal distance until the limit is reached.

    Returns:
        `(selected, unselected)`, both `{frame_idx: output}`; `selected` lists the nearest frame
        before, then the nearest after, then the rest by distance.
    """
    if max_cond_frame_num == -1 or len(cond_frame_outputs) <= max_cond_frame_num:
        return dict(cond_frame_outputs), {}
    if max_cond_frame_num < 2:
        raise ValueError(
            f"max_cond_frames_in_attn={max_cond_frame_num} but {len(cond_frame_outputs)} frames are "
            "prompted: the tracker needs at least 2 (the nearest prompted frame on each side); "
            "use -1 for no limit"
        )
    before = [t for t in cond_frame_outputs if t < frame_idx]
    at_or_after = [t for t in cond_frame_outputs if t >= frame_idx]
    chosen = ([max(before)] if before else []) + ([min(at_or_after)] if at_or_after else [])
    by_distance = sorted((t for t in cond_frame_outputs if t not in chosen), key=lambda t: abs(t - frame_idx))
    chosen += by_distance[: max_cond_frame_num - len(chosen)]
    selected = {t: cond_frame_outputs[t] for t in chosen}
    unselected = {t: out for t, out in cond_frame_outputs.items() if t not in selected}
    return selected, unselected


def recent_frame_slots(
    frame_idx: int, *, num_maskmem: int, stride: int, track_in_reverse: bool
) -> list[tuple[int, int]]:
    """The tracked frames that fill memory slots 1 .. num_maskmem - 1.

    Slot `num_maskmem - 1` holds the frame right before `frame_idx`; the older slots step back
    `stride` frames at a time from the latest multiple of `stride` that is at least 2 frames
    back (XMem's and Cutie's `r`). In reverse, "before" means a larger frame index.

    Returns:
        `[(slot, frame index)]` in slot order; indices may be negative or past the clip end
        (no frame is stored there, the slot stays empty).
    """
    slots = []
    for slot in range(1, num_maskmem):
        frames_back = num_maskmem - slot
        if frames_back == 1:
            offset_frame = frame_idx + 1 if track_in_reverse else frame_idx - 1
        elif track_in_reverse:
            nearest_on_grid = -(-(frame_idx + 2) // stride) * stride  # ceil to the stride grid
            offset_frame = nearest_on_grid + (frames_back - 2) * stride
        else:
            nearest_on_grid = ((frame_idx - 2) // stride) * stride
            offset_frame = nearest_on_grid - (frames_back - 2) * stride
        slots.append((slot, offset_frame))
    return slots


@dataclass
class MemorySelection:
    """The frames one step attends to.

    Attributes:
        cond_outputs: prompted frames in attention, `{frame_idx: output}`.
        spare_cond_outputs: prompted frames left out by `max_cond_frames_in_attn`; they still
            count as recent frames when they fall into a recent slot.
        spatial: `[(slot, output)]` whose spatial memories are used, slot 0 for prompted frames.
    """

    cond_outputs: dict[int, FrameOutput]
    spare_cond_outputs: dict[int, FrameOutput]
    spatial: list[tuple[int, FrameOutput]] = field(default_factory=list)

    def stored_output(self, output_dict: Mapping[str, Mapping[int, FrameOutput]], t: int) -> FrameOutput | None:
        """The tracked output of frame `t`, or a left-out prompted one, or None."""
        out = output_dict["non_cond_frame_outputs"].get(t)
        return out if out is not None else self.spare_cond_outputs.get(t)


def select_memory_frames(
    frame_idx: int,
    output_dict: Mapping[str, Mapping[int, FrameOutput]],
    *,
    num_maskmem: int,
    max_cond_frames_in_attn: int,
    stride: int,
    track_in_reverse: bool,
) -> MemorySelection:
    """Pick the prompted and recent frames whose memories the frame `frame_idx` attends to."""
    cond_frame_outputs = output_dict["cond_frame_outputs"]
    if not cond_frame_outputs:
        raise ValueError(
            f"frame {frame_idx} is tracked (not an initial conditioning frame) but no frame has been "
            "prompted yet: add points, a box or a mask on some frame first"
        )
    selected, unselected = select_closest_cond_frames(frame_idx, cond_frame_outputs, max_cond_frames_in_attn)
    selection = MemorySelection(selected, unselected)
    selection.spatial = [(0, out) for out in selected.values()]
    for slot, t in recent_frame_slots(
        frame_idx, num_maskmem=num_maskmem, stride=stride, track_in_reverse=track_in_reverse
    ):
        out = selection.stored_output(output_dict, t)
        if out is not None:
            selection.spatial.append((slot, out))
    return selection


def spatial_memory_tokens(
    spatial: list[tuple[int, FrameOutput]], maskmem_tpos_enc: Tensor, *, device: torch.device
) -> tuple[list[Tensor], list[Tensor]]:
    """Flatten the selected frames' memories into tokens with spatial + temporal encodings.

    Args:
        spatial: `[(slot, output)]`; each output holds `maskmem_features` `[B, C_mem, h, w]` and
            `maskmem_pos_enc`, a list whose last entry is `[B, C_mem, h, w]`.
        maskmem_tpos_enc: `[num_maskmem, 1, 1, C_mem]`; slot `s` uses row `num_maskmem - 1 - s`.

    Returns:
        Per frame, memory tokens `[h*w, B, C_mem]` and their position encodings, same shape.
    """
    num_maskmem = maskmem_tpos_enc.shape[0]
    tokens, positions = [], []
    for slot, out in spatial:
        # Memories may have been offloaded to the CPU between frames.
        features = out["maskmem_features"].to(device, non_blocking=True)
        tokens.append(features.flatten(2).permute(2, 0, 1))
        spatial_pos = out["maskmem_pos_enc"][-1].to(device).flatten(2).permute(2, 0, 1)
        positions.append(spatial_pos + maskmem_tpos_enc[num_maskmem - slot - 1])
    return tokens, positions
