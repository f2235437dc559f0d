"""Position encodings: 2-D sine grids, random Fourier features, 1-D sine codes and axial rotary tables.

None of these modules owns a trained parameter. `PositionEmbeddingRandom` keeps its random
frequency matrix as the buffer `positional_encoding_gaussian_matrix` (part of the checkpoint);
the sine and rotary tables are recomputed on demand and cached per feature size, outside the
state dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn


def _sine_frequencies(num_feats: int, temperature: float, device: torch.device | None = None) -> Tensor:
    """Divisors `temperature ** (2 * (i // 2) / num_feats)` for `i < num_feats`, shape `[num_feats]`.

    Consecutive channels share a frequency, so a channel pair holds the sine and cosine of one angle.
    """
    index = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (index // 2) / num_feats)


def _interleaved_sine(angles: Tensor) -> Tensor:
    """`[..., D]` angles -> `[..., D]`: sine on even channels, cosine on odd channels."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def get_1d_sine_pe(pos_inds: Tensor, dim: int, temperature: float = 10000) -> Tensor:
    """Transformer-style sine code of scalar positions (used for object-pointer time offsets).

    Args:
        pos_inds: positions, any shape `[...]`.
        dim: output width; the first half holds sines, the second half cosines.
        temperature: longest wavelength scale.

    Returns:
        `[..., dim]` float32 codes.
    """
    angles = pos_inds.unsqueeze(-1) / _sine_frequencies(dim // 2, temperature, pos_inds.device)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class PositionEmbeddingSine(nn.Module):
    """The DETR sine encoding of a 2-D feature grid: half the channels encode y, half encode x.

    Args:
        num_pos_feats: output channels `C` (even).
        temperature: longest wavelength scale.
        normalize: map grid coordinates to `(0, scale]` before encoding.
        scale: coordinate range when normalizing (default `2 * pi`).
        warmup_cache: on CUDA, precompute the grids for `image_size // stride`. (A compiled model
            builds its grids inside the graph instead: reading or filling the cache while
            tracing would make the compiled code guard on its contents and recompile once
            they change.)
        image_size, strides: which grid sizes the warm-up fills.
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: int = 10000,
        normalize: bool = True,
        scale: float | None = None,
        warmup_cache: bool = True,
        image_size: int = 1024,
        strides: Sequence[int] = (4, 8, 16, 32),
    ) -> None:
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be even (half for y, half for x), got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("scale only applies to normalized coordinates: pass normalize=True or drop scale")
        self.num_pos_feats = num_pos_feats // 2  # channels per axis
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.cache: dict[tuple[int, int], Tensor] = {}
        if warmup_cache and torch.cuda.is_available():
            for stride in strides:
                self._grid(image_size // stride, image_size // stride, torch.device("cuda"))

    def _encode_xy(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized coordinates `[N]` each -> (`[N, C/2]` x codes, `[N, C/2]` y codes)."""
        if x.ndim != 1 or x.shape != y.shape:
            raise ValueError(f"x and y must be 1-D of equal length, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
        freqs = _sine_frequencies(self.num_pos_feats, self.temperature, x.device)
        pos_x = _interleaved_sine((x * self.scale)[:, None] / freqs)
        pos_y = _interleaved_sine((y * self.scale)[:, None] / freqs)
        return pos_x, pos_y

    @torch.no_grad()
    def encode_boxes(self, x: Tensor, y: Tensor, w: Tensor, h: Tensor) -> Tensor:
        """Boxes given by normalized centre `x, y` and size `w, h` (each `[N]`) -> `[N, C + 2]`."""
        pos_x, pos_y = self._encode_xy(x, y)
        return torch.cat((pos_y, pos_x, h[:, None], w[:, None]), dim=1)

    encode = encode_boxes  # older name of the same method

    @torch.no_grad()
    def encode_points(self, x: Tensor, y: Tensor, labels: Tensor) -> Tensor:
        """Normalized points `x, y` and their `labels` (each `[B, N]`) -> `[B, N, C + 1]`."""
        if not (x.shape == y.shape == labels.shape) or x.ndim != 2:
            raise ValueError(
                f"x, y and labels must share one [B, N] shape, got {tuple(x.shape)}, {tuple(y.shape)}, "
                f"{tuple(labels.shape)}"
            )
        pos_x, pos_y = self._encode_xy(x.flatten(), y.flatten())
        pos_x, pos_y = pos_x.unflatten(0, x.shape), pos_y.unflatten(0, y.shape)
        return torch.cat((pos_y, pos_x, labels[:, :, None]), dim=2)

    @torch.no_grad()
    def _grid(self, height: int, width: int, device: torch.device) -> Tensor:
        """The `[C, H, W]` encoding of an `H x W` grid, cached per size (not while compiling)."""
        key = (height, width)
        compiling = torch.compiler.is_compiling()
        cached = None if compiling else self.cache.get(key)
        if cached is not None:
            return cached.to(device)
        # Grid coordinates start at 1 so that, normalized, they end exactly at `scale`.
        y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            eps = 1e-6
            y = y / (y[-1:] + eps) * self.scale
            x = x / (x[-1:] + eps) * self.scale
        freqs = _sine_frequencies(self.num_pos_feats, self.temperature, device)
        pos_y = _interleaved_sine(y[:, None] / freqs)[:, None, :].expand(height, width, -1)
        pos_x = _interleaved_sine(x[:, None] / freqs)[None, :, :].expand(height, width, -1)
        grid = torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1).contiguous()
        if not compiling:
            self.cache[key] = grid
        return grid

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Encoding for the grid of a feature map `x` `[B, *, H, W]` -> `[B, C, H, W]` float32."""
        grid = self._grid(x.shape[-2], x.shape[-1], x.device)
        return grid[None].repeat(x.shape[0], 1, 1, 1)


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2-D coordinates (SAM's prompt and image-grid encoding).

    Args:
        num_pos_feats: number of random frequencies; outputs have `2 * num_pos_feats` channels.
        scale: standard deviation of the frequencies (values `<= 0` or None mean 1).
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: Tensor) -> Tensor:
        """Coordinates in `[0, 1]`, `[..., 2]` as (x, y) -> `[..., 2 * num_pos_feats]` (sines, then cosines)."""
        centered = 2 * coords - 1
        angles = 2 * math.pi * (centered @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, size: tuple[int, int]) -> Tensor:
        """Encoding of the pixel centres of an `(H, W)` grid -> `[C, H, W]`."""
        height, width = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        coords = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # [H, W, 2] as (x, y)
        return self._pe_encoding(coords).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Pixel coordinates `[B, N, 2]` as (x, y) in an image of `image_size` (H, W) -> `[B, N, C]`."""
        height, width = image_size
        coords = torch.stack((coords_input[..., 0] / width, coords_input[..., 1] / height), dim=-1)
        return self._pe_encoding(coords.to(torch.float))


class AxialRotaryTables:
    """Cosine/sine tables of 2-D axial rotary position encoding.

    Each attention head's `head_dim` channels form `head_dim / 2` rotation pairs: the first half
    of the pairs turn with the token's column (x), the second half with its row (y), at
    frequencies `theta ** (-4 i / head_dim)`. Tokens are ordered row by row (x fastest).
    In the official layout pair `i` is channels `(2i, 2i+1)` of a head; `rotate_halves` takes
    them in the order `pairs_to_halves` gives. Rotations run in float32 whatever the input
    dtype, in real arithmetic, so they work under bfloat16 autocast and `torch.compile`.
    """

    # Tables per (head_dim, theta, end_x, end_y, device), shared by every instance: the memory
    # attention's layers all use the same ones (8 copies were 64 MiB at 1024 px).
    _tables: ClassVar[dict[tuple[int, float, int, int, torch.device], tuple[Tensor, Tensor]]] = {}

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        if head_dim % 4 != 0:
            raise ValueError(f"axial rotary encoding needs a head dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def angles(self, end_x: int, end_y: int) -> Tensor:
        """Rotation angles `[end_x * end_y, head_dim / 2]` for a grid of `end_y` rows of `end_x` tokens."""
        exponents = torch.arange(0, self.head_dim, 4)[: self.head_dim // 4].float() / self.head_dim
        freqs = 1.0 / (self.theta**exponents)
        token = torch.arange(end_x * end_y, dtype=torch.float32)
        col = token % end_x
        row = torch.div(token, end_x, rounding_mode="floor")
        return torch.cat([torch.outer(col, freqs), torch.outer(row, freqs)], dim=-1)

    def get(self, end_x: int, end_y: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin), each `[end_x * end_y, head_dim / 2]` float32 on `device`, cached per size and
        device. Keys spanning several grids (memory frames) broadcast them over the frames rather
        than repeat them, so one table serves any number of memories.

        While compiling, the tables are built inside the graph and not cached: a graph that read
        or filled the cache would guard on its contents and recompile when they change."""
        if torch.compiler.is_compiling():
            return self._cos_sin(end_x, end_y, device)
        key = (self.head_dim, self.theta, end_x, end_y, torch.device(device))
        tables = self._tables.get(key)
        if tables is None:
            # Plain tensors even when first asked for under inference mode, so that training
            # can save them for backward later.
            with torch.inference_mode(False):
                tables = self._cos_sin(end_x, end_y, device)
            self._tables[key] = tables
        return tables

    def _cos_sin(self, end_x: int, end_y: int, device: torch.device) -> tuple[Tensor, Tensor]:
        angles = self.angles(end_x, end_y).to(device)
        return angles.cos(), angles.sin()


def pairs_to_halves(x: Tensor, head_dim: int, dim: int = -1) -> Tensor:
    """Reorder the channels along `dim` (heads of `head_dim` channels, each pair side by side as in
    the official layout) into halves order: per head the first channel of every pair, then the
    second (`0, 2, 4, ..., 1, 3, 5, ...`), as `rotate_halves` takes them. A strided copy, whose
    gradient is the inverse reordering."""
    dim = dim % x.ndim
    return x.unflatten(dim, (-1, head_dim // 2, 2)).transpose(dim + 1, dim + 2).flatten(dim, dim + 2)


def rotate_halves(x: Tensor, cos: Tensor, sin: Tensor, num_rotated: int | None = None) -> Tensor:
    """Rotate the channel pairs `(x[i], x[D/2 + i])` of `x` `[..., L, D]` by the angles of
    `cos`/`sin` `[N, D/2]`: `(a, b) -> (a cos - b sin, b cos + a sin)`.

    The first `num_rotated` tokens (default: all `L`) are whole grids of `N` tokens, each turned
    by the same tables (memory frames); the rest (object pointers) are copied unturned. One
    autograd node; returns `x`'s dtype, computed in float32. With each pair's two channels
    `D/2` apart, every operand is a contiguous run of channels (pairs side by side took a
    channel swap, a slow copy on the CPU).
    """
    return _HalfRotation.apply(x, cos, sin, x.shape[-2] if num_rotated is None else num_rotated)


class _HalfRotation(torch.autograd.Function):
    """`rotate_halves` with its gradient, the inverse rotation of the incoming gradient, in the
    same four kernels; only the tables are kept for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, num_rotated: int) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.num_rotated = num_rotated
        return _rotate(x, cos, sin, num_rotated, inverse=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, ctx.num_rotated, inverse=True), None, None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, num_rotated: int, inverse: bool) -> Tensor:
    source = x.float()
    grids = (num_rotated // cos.shape[0], cos.shape[0])
    half = x.shape[-1] // 2
    a, b = source[..., :num_rotated, :].unflatten(-2, grids).split(half, dim=-1)
    sign = 1.0 if inverse else -1.0
    if torch.compiler.is_compiling():  # `out=` into strided views would break the graph; the compiler fuses this
        turned = torch.cat((a * cos + sign * (b * sin), b * cos - sign * (a * sin)), dim=-1).flatten(-3, -2)
        return torch.cat((turned, source[..., num_rotated:, :]), dim=-2).to(x.dtype)
    out = torch.empty_like(source)
    out_a, out_b = out[..., :num_rotated, :].unflatten(-2, grids).split(half, dim=-1)
    torch.mul(a, cos, out=out_a).addcmul_(b, sin, value=sign)
    torch.mul(b, cos, out=out_b).addcmul_(a, sin, value=-sign)
    if num_rotated < x.shape[-2]:
        out[..., num_rotated:, :] = source[..., num_rotated:, :]
    return out.to(x.dtype)
