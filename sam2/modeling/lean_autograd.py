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
import functools
from typing import Callable, ContextManager, NamedTuple

import numpy as np
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
    autograd, for a tensor laid out otherwise, while `torch.compile` traces, or under other
    saved-tensor hooks (activation checkpointing, offloading: they decide what is kept), this is a
    no-op context. Saved tensors are matched by storage, not by address: meta and fake tensors,
    which have none, are told apart too (shape-only runs plan memory with the rebuilds in place).
    """
    if torch.compiler.is_compiling():  # a compiled graph decides what it saves and recomputes
        return contextlib.nullcontext()
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if outer is not None and not getattr(outer[0], "_rebuilds", False):
        return contextlib.nullcontext()
    if not (torch.is_grad_enabled() and tensor.is_contiguous() and tensor.storage_offset() == 0):
        return contextlib.nullcontext()
    outer_pack = outer[0] if outer is not None else None
    storage = tensor.untyped_storage()._cdata  # the StorageImpl that every view of `tensor` shares

    def pack(saved: Tensor) -> Tensor | _Recipe:
        if saved.untyped_storage()._cdata == storage:
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
    if not (x.is_floating_point() and _autocast_on(x.device.type)):
        return None
    dtype = torch.get_autocast_dtype(x.device.type)
    return dtype if dtype != x.dtype else None


def rebuilt_activation(act: Callable[[Tensor], Tensor], pre_activation: Tensor, activated: Tensor) -> ContextManager[None]:
    """While open, `activated = act(pre_activation)` is rebuilt in backward rather than kept by the
    layer reading it, where that saves memory: a GELU keeps its input, so its output (the block's
    widest tensor) need not be kept as well. A ReLU keeps its output, which the reader's saving
    shares: nothing to gain, and this is a no-op."""
    if not isinstance(act, torch.nn.GELU):
        return contextlib.nullcontext()
    return rebuilt_in_backward(activated, functools.partial(act, pre_activation))


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_widens_norm(x: Tensor) -> bool:
    """Whether autocast would run a LayerNorm of `x` in float32 here, casting `x` up first.

    CUDA autocast does (LayerNorm is on its float32 list) and keeps that copy for backward, twice
    the size of a bfloat16 `x`; the CPU's does not. Asked of autocast itself, once per setting.
    """
    if torch.compiler.is_compiling() or x.dtype not in (torch.bfloat16, torch.float16) or not _autocast_on(x.device.type):
        return False
    return _norm_widens(x.device.type, x.dtype, torch.get_autocast_dtype(x.device.type))


@functools.cache
def _norm_widens(device_type: str, dtype: torch.dtype, autocast_dtype: torch.dtype) -> bool:
    probe = torch.ones(1, 2, dtype=dtype, device=device_type)
    return F.layer_norm(probe, (2,)).dtype == torch.float32


def widened_norm(norm: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Callable[[], Tensor]]:
    """`norm(x)` and a function recomputing it bit for bit in backward (which runs outside autocast).

    Where autocast widens the norm (`autocast_widens_norm`), `x` is cast to float32 here instead,
    and that copy is rebuilt from `x` (exactly) rather than kept: the norm computes on the same
    float32 values, and backward keeps `x` alone. The recomputation repeats the float32 norm, as
    the forward ran it. Elsewhere it is `norm(x)` and `norm(x)` again.
    """
    if not autocast_widens_norm(x):
        return norm(x), functools.partial(norm, x)
    wide = x.float()
    with rebuilt_in_backward(wide, x.float):
        normed = norm(wide)
    return normed, lambda: norm(x.float())


def _unpack(packed: Tensor | _Recipe) -> Tensor:
    if isinstance(packed, _Recipe):
        return packed.rebuild().as_strided(packed.size, packed.stride, packed.offset)
    return packed


def dropout(x: Tensor, p: float, training: bool) -> tuple[Tensor, Callable[[], Tensor] | None]:
    """`F.dropout(x, p, training)` and, on the CPU and CUDA, a function that rebuilds its output.

    Where `x` is saved anyway (a ReLU keeps its output), the layer that reads the dropout's output
    can rebuild it in backward (`rebuilt_in_backward`) rather than keep it. The draws are torch's:
    - On the CPU torch draws a float mask with `bernoulli_(1 - p)`, scales it by `1 / (1 - p)`,
      multiplies and keeps the scaled mask for backward. This does exactly that, and the rebuild
      is `x * mask`. (Keeping a bool mask instead would save more, but rebuilding the float mask
      twice per backward cost more time than it saved memory.)
    - On CUDA `F.dropout` is the fused `native_dropout`, which keeps a bool mask for backward. The
      rebuild is that backward's kernel applied to `x`: both compute `(float(mask) * x) * scale` in
      float32 with the same float32 scale, so it gives the output bit for bit.
    Elsewhere, outside autograd, or for p of 0 or 1, this is `F.dropout` and no rebuild.
    """
    if not (training and 0.0 < p < 1.0 and torch.is_grad_enabled() and x.requires_grad):
        return F.dropout(x, p, training), None
    if x.device.type == "cpu":
        noise = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
        return x * noise, lambda: x * noise
    if x.device.type == "cuda":
        return fused_dropout(x, p)
    return F.dropout(x, p, training), None


def fused_dropout(x: Tensor, p: float) -> tuple[Tensor, Callable[[], Tensor]]:
    """`torch.native_dropout` (what `F.dropout` runs on CUDA) and the rebuild of its output."""
    out, mask = torch.native_dropout(x, p, True)
    scale = _fused_dropout_scale(p)
    return out, lambda: torch.ops.aten.native_dropout_backward(x, mask, scale)


@functools.cache
def _fused_dropout_scale(p: float) -> float:
    """The CUDA kernel's scale: 1 / (1 - p) divided in float32 (in float64 it can round differently)."""
    return float(np.float32(1.0) / np.float32(1.0 - p))
