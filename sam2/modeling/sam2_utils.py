"""Small layers shared by several SAM 2 modules.

Parameter names (`layers.0.weight`, `weight`/`bias` of `LayerNorm2d`) are part of the checkpoint
format and match the official release.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sam2.modeling.lean_autograd import rebuilt_activation


class MLP(nn.Module):
    """`num_layers` linear layers with an activation between them (none after the last).

    Args:
        input_dim: features in.
        hidden_dim: width of every hidden layer.
        output_dim: features out.
        num_layers: number of `nn.Linear` layers, stored as `layers.<i>`.
        activation: activation class, instantiated once.
        sigmoid_output: apply a sigmoid to the output.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.sigmoid_output = sigmoid_output
        self.act = activation()

    def forward(self, x: Tensor) -> Tensor:
        first, *rest = self.layers
        x = first(x)
        for layer in rest:
            activated = self.act(x)
            with rebuilt_activation(self.act, x, activated):
                x = layer(activated)
        return torch.sigmoid(x) if self.sigmoid_output else x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a `[B, C, H, W]` tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = x.new_empty(mask_shape).bernoulli_(keep_prob)
        if self.scale_by_keep and keep_prob > 0.0:
            keep.div_(keep_prob)
        return x * keep


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


def resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """`F.interpolate(x, size, mode)` ("bilinear" or "bicubic", corners not aligned, no antialias),
    with a backward of two small matmuls.

    Such a resize is linear and separable, `resize_h @ x @ resize_w^T`, so its gradient is
    `resize_h^T @ grad @ resize_w`: on the CPU a fraction of the kernels' scatter (the bicubic
    position embedding at 256 px: 11 ms), and the same sums up to float rounding. The forward is
    torch's kernel, bit for bit.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _SeparableResize.apply(x, tuple(size), mode)
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class _SeparableResize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
        ctx.in_size, ctx.mode = x.shape[-2:], mode
        return F.interpolate(x, size=size, mode=mode, align_corners=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        resize_h, resize_w = (
            _resize_matrix(size_in, size_out, ctx.mode, grad) for size_in, size_out in zip(ctx.in_size, grad.shape[-2:])
        )
        return resize_h.T @ grad @ resize_w, None, None


def _resize_matrix(size_in: int, size_out: int, mode: str, like: Tensor) -> Tensor:
    """`[size_out, size_in]` weights of `F.interpolate` along one axis, in `like`'s dtype and device.

    Cached: every prediction step's mask upsampling asks for the same two (building 256 -> 1024
    takes ~1 ms on a CPU). Not while tracing, whose tensors must not outlive the trace.
    """
    if type(like) is not torch.Tensor or torch.compiler.is_compiling():
        return _build_resize_matrix(size_in, size_out, mode, like.dtype, like.device)
    return _cached_resize_matrix(size_in, size_out, mode, like.dtype, like.device)


def _build_resize_matrix(size_in: int, size_out: int, mode: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Read off the resize of a basis (the other axis keeps size 1, whose weights are exactly 0, 1, 0, 0)."""
    basis = torch.eye(size_in, dtype=dtype, device=device)[:, None, :, None]
    return F.interpolate(basis, size=(size_out, 1), mode=mode, align_corners=False)[:, 0, :, 0].T


_cached_resize_matrix = lru_cache(maxsize=64)(_build_resize_matrix)


def get_activation_fn(activation: str) -> Callable[[Tensor], Tensor]:
    """The functional activation named in a config (`relu`, `gelu`, `glu`)."""
    try:
        return _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}") from None


def get_clones(module: nn.Module, count: int) -> nn.ModuleList:
    """`count` independent deep copies of `module`."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(count))
