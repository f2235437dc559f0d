"""Autograd keeps fewer activations for backward, with gradients unchanged to the bit.

For backward, autograd saves inputs of many ops. Some of them can be rebuilt exactly, and
cheaply, from tensors that autograd saves anyway: a GELU's output from its input (which the GELU
keeps), a dropout's output from the activation it masked and the dropout's own mask. While
`rebuilt_in_backward` is open, autograd stores a recipe in place of such a tensor and runs it when
backward asks for the tensor. Forward and backward run the same kernels on the same values as
without it; only what sits in memory between the two passes changes.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class _Recipe(NamedTuple):
    rebuild: Callable[[], Tensor]
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def rebuilt_in_backward(tensor: Tensor, rebuild: Callable[[], Tensor]) -> ContextManager[None]:
    """Inside this context, autograd saves `rebuild` instead of `tensor` (or any view of it).

    Args:
        tensor: a contiguous tensor that owns its storage from the start.
        rebuild: returns a bit-identical contiguous copy of `tensor`; it runs during backward,
            once for each op that saved the tensor, so it must only read tensors that autograd
            keeps anyway (or it keeps them alive and saves nothing).

    Contexts nest: each rebuilds its own tensor and hands the rest to the enclosing one. Outside
    autograd, for a tensor laid out otherwise or on the meta device, while `torch.compile`
    traces, or under other saved-tensor hooks (activation checkpointing, offloading: they decide
    what is kept), this is a no-op context.
    """
    if torch.compiler.is_compiling():  # a compiled graph decides what it saves and recomputes
        return contextlib.nullcontext()
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if outer is not None and not getattr(outer[0], "_rebuilds", False):
        return contextlib.nullcontext()
    if not (torch.is_grad_enabled() and tensor.is_contiguous() and tensor.storage_offset() == 0):
        return contextlib.nullcontext()
    if tensor.device.type == "meta":  # no storage address to tell tensors apart by
        return contextlib.nullcontext()
    outer_pack = outer[0] if outer is not None else None
    storage = tensor.untyped_storage().data_ptr()

    def pack(saved: Tensor) -> Tensor | _Recipe:
        if saved.untyped_storage().data_ptr() == storage:
            return _Recipe(rebuild, saved.size(), saved.stride(), saved.storage_offset())
        return outer_pack(saved) if outer_pack is not None else saved

    pack._rebuilds = True  # type: ignore[attr-defined]
    return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)


def autocast_matmul_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would cast `x` to as a matmul's input here, or None where it would not
    cast it (no autocast, or already that dtype).

    A matmul under autocast keeps, for backward, the copy it casts its input to, which no
    `rebuilt_in_backward` of the input reaches. Casting beforehand, with this dtype, makes that
    copy a tensor of the caller's, which it can rebuild (fixing the dtype now: backward runs
    outside autocast). The matmul then finds its input in the right dtype and casts nothing, so
    the values are those autocast would have given.
    """
    device = x.device.type
    if not (x.is_floating_point() and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype != x.dtype else None


def _unpack(packed: Tensor | _Recipe) -> Tensor:
    if isinstance(packed, _Recipe):
        return packed.rebuild().as_strided(packed.size, packed.stride, packed.offset)
    return packed


def dropout(x: Tensor, p: float, training: bool) -> tuple[Tensor, Callable[[], Tensor] | None]:
    """`F.dropout(x, p, training)` and, on the CPU, a function that rebuilds its output from `x`.

    On the CPU torch draws a float mask with `bernoulli_(1 - p)`, scales it by `1 / (1 - p)`,
    multiplies and keeps the scaled mask for backward. This does exactly that and also returns
    `lambda: x * mask`: where `x` is saved anyway (a ReLU keeps its output), the layer that reads
    the dropout's output can rebuild it in backward (`rebuilt_in_backward`) rather than keep it.
    (Keeping a bool mask instead of the float one would save more, but rebuilding the float mask
    twice per backward cost more time than it saved memory.) On CUDA torch's fused dropout keeps
    only a bool mask, the output cannot be rebuilt cheaply, and this is `F.dropout`.
    """
    if not (training and 0.0 < p < 1.0 and x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad):
        return F.dropout(x, p, training), None
    noise = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * noise, lambda: x * noise
