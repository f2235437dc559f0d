"""Windowing helpers and the patch embedding shared by the Hiera trunk.

Tokens travel channels-last (`[B, H, W, C]`) through the trunk, so every helper here takes and
returns that layout.
"""

from __future__ import annotations

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
