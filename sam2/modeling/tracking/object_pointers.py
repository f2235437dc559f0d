"""Object pointers: a per-frame summary token of the tracked object, attended to like memory.

Each frame's SAM output token is projected (`obj_ptr_proj`) into a pointer `[B, C]`. When the
object is predicted absent the pointer is blended with the learned `no_obj_ptr`. Later frames
attend to the pointers of the prompted frames and of up to `max_obj_ptrs_in_encoder - 1` recent
frames, each tagged with a sine encoding of its distance in time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sam2.modeling.position_encoding import get_1d_sine_pe
from sam2.modeling.tracking.memory_bank import FrameOutput, MemorySelection
from sam2.modeling.tracking.options import ObjectPointerOptions


def blend_absent_object_pointer(
    obj_ptr: Tensor, visibility: Tensor, no_obj_ptr: Tensor, *, fixed_no_obj_ptr: bool
) -> Tensor:
    """Mix the learned "no object" pointer into pointers of objects predicted absent.

    Args:
        obj_ptr: `[B, C]` pointers from the SAM output token.
        visibility: `[B, 1]`, 1 for a visible object, 0 for an absent one (or a soft value).
        no_obj_ptr: `[1, C]`.
        fixed_no_obj_ptr: an absent object's own pointer is dropped rather than kept.

    Returns:
        `[B, C]`.
    """
    if fixed_no_obj_ptr:
        obj_ptr = visibility * obj_ptr
    return obj_ptr + (1 - visibility) * no_obj_ptr


def collect_pointers(
    frame_idx: int,
    selection: MemorySelection,
    output_dict: Mapping[str, Mapping[int, FrameOutput]],
    *,
    num_frames: int | None,
    options: ObjectPointerOptions,
    training: bool,
    track_in_reverse: bool,
) -> list[tuple[int, Tensor]]:
    """The pointers frame `frame_idx` attends to, with their temporal distances.

    Returns:
        `[(distance, obj_ptr [B, C])]`: prompted frames first (signed or absolute distance, per
        `use_signed_tpos_enc_to_obj_ptrs`), then recent frames nearest first (distance 1, 2, ...).
    """
    max_pointers = _max_pointers(num_frames, options)
    direction = -1 if track_in_reverse else 1
    cond_outputs = selection.cond_outputs
    if not training and options.only_obj_ptrs_in_the_past_for_eval:
        cond_outputs = {t: out for t, out in cond_outputs.items() if (t - frame_idx) * direction <= 0}
    pointers = []
    for t, out in cond_outputs.items():
        distance = (frame_idx - t) * direction if options.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t)
        pointers.append((distance, out["obj_ptr"]))
    for frames_back in range(1, max_pointers):
        t = frame_idx - frames_back * direction
        if t < 0 or (num_frames is not None and t >= num_frames):
            break
        out = selection.stored_output(output_dict, t)
        if out is not None:
            pointers.append((frames_back, out["obj_ptr"]))
    return pointers


def pointer_tokens(
    pointers: list[tuple[int, Tensor]],
    *,
    num_frames: int | None,
    options: ObjectPointerOptions,
    tpos_proj: nn.Module,
    mem_dim: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Stack pointers into memory tokens with their temporal position encodings.

    A pointer wider than the memory (`C > mem_dim`) is cut into `C // mem_dim` tokens that share
    its encoding.

    Args:
        pointers: non-empty `[(distance, obj_ptr [B, C])]` from `collect_pointers`.
        tpos_proj: maps the `[N, C]` (projected) or `[N, mem_dim]` sine code to `[N, mem_dim]`.
        device: where the current frame's features live.

    Returns:
        `(tokens, positions)`, both `[N * C // mem_dim, B, mem_dim]`.
    """
    distances, ptrs = zip(*pointers)
    obj_ptrs = torch.stack(ptrs, dim=0)
    num_ptrs, batch, channels = obj_ptrs.shape
    if options.add_tpos_enc_to_obj_ptrs:
        # Distances are normalised by the largest one a recent pointer can have.
        max_distance = _max_pointers(num_frames, options) - 1
        code_dim = channels if options.proj_tpos_enc_in_obj_ptrs else mem_dim
        rel_pos = torch.tensor(distances).to(device=device, non_blocking=True)
        pos = tpos_proj(get_1d_sine_pe(rel_pos / max_distance, dim=code_dim))
        pos = pos.unsqueeze(1).expand(-1, batch, mem_dim)
    else:
        pos = obj_ptrs.new_zeros(num_ptrs, batch, mem_dim)
    if mem_dim < channels:
        pieces = channels // mem_dim
        obj_ptrs = obj_ptrs.reshape(num_ptrs, batch, pieces, mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
        pos = pos.repeat_interleave(pieces, dim=0)
    return obj_ptrs, pos


def _max_pointers(num_frames: int | None, options: ObjectPointerOptions) -> int:
    if num_frames is None:
        return options.max_obj_ptrs_in_encoder
    return min(num_frames, options.max_obj_ptrs_in_encoder)
