"""Windowing helpers and the patch embedding shared by the Hiera trunk.

Tokens travel channels-last (`[B, H, W, C]`) through the trunk, so every helper here takes and
returns that layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def window_partition(
    x: Tensor, window_size: int, pad_value: Tensor | None = None
) -> tuple[Tensor, tuple[int, int]]:
    """Cut a token map into non-overlapping square windows, padding bottom and right.

    Args:
        x: tokens `[B, H, W, C]`.
        window_size: side of a window, in tokens.
        pad_value: the token `[C]` that fills the padding; zeros when `None`.

    Returns:
        windows `[B * num_windows, window_size, window_size, C]`, ordered row-major over the
        window grid of each image in turn, and the padded size `(Hp, Wp)`.
    """
    batch, height, width, channels = x.shape
    padded_h = -(-height // window_size) * window_size
    padded_w = -(-width // window_size) * window_size
    if pad_value is None and (padded_h, padded_w) != (height, width):
        x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
    elif pad_value is not None:
        if padded_w != width:
            x = torch.cat([x, pad_value.expand(batch, height, padded_w - width, channels)], dim=2)
        if padded_h != height:
            x = torch.cat([x, pad_value.expand(batch, padded_h - height, padded_w, channels)], dim=1)
    rows, cols = padded_h // window_size, padded_w // window_size
    grid = x.reshape(batch, rows, window_size, cols, window_size, channels)
    windows = grid.transpose(2, 3).reshape(batch * rows * cols, window_size, window_size, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(windows: Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of `window_partition`: stitch windows back together and drop the padding.

    Args:
        windows: `[B * num_windows, window_size, window_size, C]`.
        window_size: side of a window, in tokens.
        pad_hw: padded size `(Hp, Wp)` the windows tile exactly.
        hw: size `(H, W)` to crop back to.

    Returns:
        tokens `[B, H, W, C]`.
    """
    padded_h, padded_w = pad_hw
    height, width = hw
    rows, cols = padded_h // window_size, padded_w // window_size
    channels = windows.shape[-1]
    grid = windows.reshape(-1, rows, cols, window_size, window_size, channels).transpose(2, 3)
    x = grid.reshape(-1, padded_h, padded_w, channels)
    if (padded_h, padded_w) != (height, width):
        x = x[:, :height, :width, :]
    return x


class WindowRun(NamedTuple):
    """Windows along one side of a map that the padding cuts alike: `count` windows from token
    `start`, each holding `real` real tokens (the rest is padding), queries at the first `queries`."""

    count: int
    start: int
    real: int
    queries: int


def window_runs(size: int, window_size: int, stride: int) -> list[WindowRun]:
    """The windows along one side of a map: the whole windows, then the window that padding cuts.
    Query extents are trimmed to whole pooling strides (the rest is cropped from the pooled
    output), and runs left without queries are dropped (their keys serve no query)."""
    whole, cut = divmod(size, window_size)
    runs = [WindowRun(whole, 0, window_size, window_size), WindowRun(1, whole * window_size, cut, cut // stride * stride)]
    return [run for run in runs if run.count and run.queries]


class WindowCells(torch.autograd.Function):
    """Cut `qkv [B, H, W, 3C]` into the windows of each (row run, column run) cell: per cell the
    queries of its real tokens `[N, queries_h, queries_w, C]`, and keys and values `[N, ws * ws, C]`
    padded with the `pad [2C]` token. The gradient goes straight into one `[B, H, W, 3C]` buffer,
    the padding's summed into `pad`'s: what window partitioning, padding by concatenation and
    splitting per cell took some ten copies of the map to do, forward and backward."""

    @staticmethod
    def forward(ctx, qkv: Tensor, pad: Tensor, window_size: int, row_runs: list[WindowRun], col_runs: list[WindowRun]):
        batch, _, _, channels = qkv.shape
        dim = channels // 3
        ctx.shape, ctx.window_size, ctx.runs = qkv.shape, window_size, (row_runs, col_runs)
        outputs = []
        for rows in row_runs:
            for cols in col_runs:
                q = _cell_view(qkv[..., :dim], rows, cols, rows.queries, cols.queries).contiguous()
                outputs.append(q.flatten(0, 2))
                for part, pad_part in zip((qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]), pad.split(dim)):
                    windows = qkv.new_empty(batch, rows.count, cols.count, window_size, window_size, dim)
                    windows[..., : rows.real, : cols.real, :] = _cell_view(part, rows, cols, rows.real, cols.real)
                    windows[..., rows.real :, :, :] = pad_part
                    windows[..., : rows.real, cols.real :, :] = pad_part
                    outputs.append(windows.view(-1, window_size * window_size, dim))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        row_runs, col_runs = ctx.runs
        batch, height, width, channels = ctx.shape
        dim, window_size = channels // 3, ctx.window_size
        # Tokens no query reads (cut off by the pooling stride, or in a dropped run) get zeros.
        covered = sum(r.count * r.real for r in row_runs) == height and sum(c.count * c.real for c in col_runs) == width
        trimmed = any(run.queries != run.real for run in (*row_runs, *col_runs))
        grad_qkv = grads[0].new_empty(ctx.shape) if covered and not trimmed else grads[0].new_zeros(ctx.shape)
        grad_pad = grads[0].new_zeros(2, dim, dtype=torch.promote_types(grads[0].dtype, torch.float32))
        cells = iter(grads)
        for rows in row_runs:
            for cols in col_runs:
                grad_q = next(cells).view(batch, rows.count, cols.count, rows.queries, cols.queries, dim)
                _cell_view(grad_qkv[..., :dim], rows, cols, rows.queries, cols.queries).copy_(grad_q)
                for part in range(2):
                    grad = next(cells).reshape(batch, rows.count, cols.count, window_size, window_size, dim)
                    target = grad_qkv[..., (part + 1) * dim : (part + 2) * dim]
                    _cell_view(target, rows, cols, rows.real, cols.real).copy_(grad[..., : rows.real, : cols.real, :])
                    grad_pad[part] += grad[..., rows.real :, :, :].sum((0, 1, 2, 3, 4))
                    grad_pad[part] += grad[..., : rows.real, cols.real :, :].sum((0, 1, 2, 3, 4))
        return grad_qkv, grad_pad.flatten().to(grads[0].dtype), None, None, None


def _cell_view(x: Tensor, rows: WindowRun, cols: WindowRun, height: int, width: int) -> Tensor:
    """The `[B, rows.count, cols.count, height, width, C]` view of `x [B, H, W, C]` holding the first
    `height` x `width` tokens of every window of one cell."""
    x = x[:, rows.start : rows.start + rows.count * rows.real, cols.start : cols.start + cols.count * cols.real]
    x = x.unflatten(1, (rows.count, rows.real)).unflatten(3, (cols.count, cols.real)).transpose(2, 3)
    return x[:, :, :, :height, :width]


class PatchEmbed(nn.Module):
    """Strided convolution from pixels to tokens: `[B, in_chans, H, W]` -> `[B, H', W', embed_dim]`."""

    def __init__(
        self,
        kernel_size: tuple[int, int] = (7, 7),
        stride: tuple[int, int] = (4, 4),
        padding: tuple[int, int] = (3, 3),
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)
