"""Hiera, the hierarchical ViT trunk of SAM 2 (https://arxiv.org/abs/2306.00989).

Tokens stay channels-last (`[B, H, W, C]`) from the patch embedding to the end of each stage.
A stage's first block halves the resolution by max-pooling its queries (and its shortcut), and
widens channels and heads; most blocks attend inside non-overlapping windows, a few globally.
Returned feature maps are `[B, C, H, W]`, highest resolution first.
"""

from __future__ import annotations

import re
from functools import partial
from itertools import accumulate
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from sam2.modeling.backbones.utils import PatchEmbed, WindowCells, window_partition, window_runs, window_unpartition
from sam2.modeling.lean_autograd import autocast_matmul_dtype, rebuilt_in_backward, widened_norm
from sam2.modeling.sam2_utils import MLP, DropPath, resize


def _pool_channels_last(x: Tensor, pool: nn.Module) -> Tensor:
    """Apply a `[B, C, H, W]` pooling layer to `[B, H, W, C]` tokens."""
    kernel = _pair(pool.kernel_size)
    windowed = kernel != (1, 1) and _pair(pool.stride) == kernel and _pair(pool.padding) == (0, 0)
    plain = _pair(pool.dilation) == (1, 1) and not pool.ceil_mode
    # While torch.compile traces, the compiler decides what backward keeps (and this Function's
    # strided `out=` writes would break the graph).
    lean = torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()
    if isinstance(pool, nn.MaxPool2d) and windowed and plain and lean:
        return _WindowMaxPool.apply(x, kernel)
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class _WindowMaxPool(torch.autograd.Function):
    """Max-pooling of `[B, H, W, C]` tokens over non-overlapping `kernel` windows, as `nn.MaxPool2d`
    computes it, whose backward keeps one bool per input element (is it its window's winner)
    instead of the input and an int64 index per output: at 2x2, one byte per input element
    instead of six. The winner is the first position holding the maximum, where max_pool2d's
    backward sends the gradient too; the gradients are equal (a zero may carry a sign, and for a
    NaN maximum, whose gradient is NaN anyway, the position may differ).
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernel: tuple[int, int]) -> Tensor:
        pooled = F.max_pool2d(x.permute(0, 3, 1, 2), kernel, kernel).permute(0, 2, 3, 1)
        out_h, out_w = pooled.shape[1:3]
        winners, all_lost = [], None
        for position in range(kernel[0] * kernel[1] - 1):
            holds_max = _window_position(x, kernel, position, out_h, out_w) == pooled
            winners.append(holds_max if all_lost is None else holds_max & all_lost)
            all_lost = ~holds_max if all_lost is None else all_lost & ~holds_max
        ctx.save_for_backward(*winners, all_lost)  # where the first positions lost, the last one won
        ctx.kernel, ctx.in_shape = kernel, x.shape
        return pooled

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out_h, out_w = grad.shape[1:3]
        grad_in = grad.new_zeros(ctx.in_shape)  # rows and columns that floor pooling left out stay 0
        for position, winner in enumerate(ctx.saved_tensors):
            torch.mul(grad, winner, out=_window_position(grad_in, ctx.kernel, position, out_h, out_w))
        return grad_in, None


def _window_position(x: Tensor, kernel: tuple[int, int], position: int, out_h: int, out_w: int) -> Tensor:
    """The `[B, out_h, out_w, C]` strided view of `[B, H, W, C]` at one row-major position of every window."""
    row, col = divmod(position, kernel[1])
    return x[:, row : out_h * kernel[0] : kernel[0], col : out_w * kernel[1] : kernel[1]]


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries may be pooled, shrinking the output grid.

    Args:
        dim: channels in.
        dim_out: channels out (also the width of queries, keys and values).
        num_heads: attention heads; `dim_out` is split evenly between them.
        q_pool: optional pooling layer applied to the query grid.
    """

    # How windows cut by the padding attend. False: queries at real tokens only, in up to four
    # batches (whole windows, last column, last row, corner), which skips the padded queries'
    # FLOPs (two thirds of the tokens at 256 px). True: all windows as one batch, queries at the
    # padding included and their outputs cropped, as the official code does: a quarter of the
    # attention calls and none of the split/merge copies, for the GPU, where training steps
    # measured host-bound (MFU 6-11 % on an H200), so ops dispatched cost more than FLOPs.
    # None: False on the CPU, True elsewhere. Outputs and gradients are the same either way.
    attend_padding: bool | None = None

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None = None) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)
        self.q_pool = q_pool
        self.dim, self.dim_out, self.num_heads = dim, dim_out, num_heads

    def forward(self, x: Tensor, window_size: int = 0, rebuild_input: Callable[[], Tensor] | None = None) -> Tensor:
        """`[B, H, W, dim]` -> `[B, H', W', dim_out]`, with `(H', W')` the pooled grid.

        With `window_size`, tokens attend only inside square windows of that side, the map
        padded at the bottom and right to whole windows. Padding is never a query (its outputs
        would be cropped) and is never projected: a padding token is a zero input, whose key and
        value are those of the qkv bias. At 256 px, where a 16-token grid meets 14-token windows,
        that is two thirds of the tokens.

        `rebuild_input` (returning `x` bit for bit from tensors that autograd keeps anyway, such
        as a norm of the block input) lets backward rebuild the projections' inputs rather than
        keep them; see `sam2.modeling.lean_autograd`.
        """
        _, height, width, _ = x.shape
        rebuild_input = rebuild_input or (lambda: x)
        if window_size and (height % window_size or width % window_size):
            with rebuilt_in_backward(x, rebuild_input):
                qkv = self.qkv(x)
            attend_padding = self.attend_padding if self.attend_padding is not None else x.device.type != "cpu"
            if attend_padding:
                # The bias in the projection's dtype: under autocast a float32 pad would promote the whole map.
                windows, padded_hw = window_partition(qkv, window_size, pad_value=self.qkv.bias.to(qkv.dtype))
                tokens = self._attend_whole(windows, window_size, (height, width), padded_hw)
            else:
                tokens = self._attend_in_padded_windows(qkv, window_size)
        else:
            if window_size:
                # Cut the input rather than the projection: dim channels to move instead of 3 * dim_out.
                windows = window_partition(x, window_size)[0]
                with rebuilt_in_backward(windows, lambda: window_partition(rebuild_input(), window_size)[0]):
                    qkv = self.qkv(windows)
            else:
                with rebuilt_in_backward(x, rebuild_input):
                    qkv = self.qkv(x)
            tokens = self._attend_whole(qkv, window_size, (height, width))
        out = tokens()
        # The attention keeps its outputs for backward; the projection's input is rebuilt from them.
        with rebuilt_in_backward(out, tokens):
            return self.proj(out)

    def _split_heads(self, q: Tensor) -> Tensor:
        """`[N, h, w, dim_out]` queries, pooled if this block pools, -> `[N, heads, h' * w', head_dim]`."""
        if self.q_pool is not None:
            q = _pool_channels_last(q, self.q_pool)
        return q.reshape(q.shape[0], -1, self.num_heads, self.dim_out // self.num_heads).transpose(1, 2)

    def _merge_heads(self, attended: Tensor, grid: tuple[int, ...]) -> Tensor:
        """`[N, heads, h * w, head_dim]` -> `[*grid, dim_out]`."""
        return attended.transpose(1, 2).reshape(*grid, self.dim_out)

    def _attend_whole(
        self, qkv: Tensor, window_size: int, hw: tuple[int, int], padded_hw: tuple[int, int] | None = None
    ) -> Callable[[], Tensor]:
        """Attention over whole windows (or the whole map): `qkv [N, h, w, 3 * dim_out]`, either the
        map or its windows, which tile the `hw` map padded to `padded_hw`. Returns a function
        building the contiguous `[B, H', W', dim_out]` output from the attention's output."""
        windows, height, width, _ = qkv.shape
        q, k, v = qkv.split(self.dim_out, dim=-1)
        k, v = (t.reshape(windows, height * width, self.num_heads, -1).transpose(1, 2) for t in (k, v))
        attended = F.scaled_dot_product_attention(self._split_heads(q), k, v)
        stride_h, stride_w = _pair(self.q_pool.stride) if self.q_pool is not None else (1, 1)
        pooled_h, pooled_w = height // stride_h, width // stride_w

        def tokens() -> Tensor:
            out = self._merge_heads(attended, (windows, pooled_h, pooled_w))
            if window_size:
                padded_h, padded_w = padded_hw or hw
                out_hw = (hw[0] // stride_h, hw[1] // stride_w)
                out = window_unpartition(out, pooled_h, (padded_h // stride_h, padded_w // stride_w), out_hw)
            return out.contiguous()

        return tokens

    def _attend_in_padded_windows(self, qkv: Tensor, window_size: int) -> Callable[[], Tensor]:
        """Windowed attention on `qkv [B, H, W, 3 * dim_out]` of the real tokens, with queries at real
        tokens only. Windows that the padding cuts alike (the whole ones, the last column, the last
        row, the corner) attend as one batch each. Returns a function building the contiguous
        `[B, H', W', dim_out]` output from the attention's outputs."""
        batch, height, width, _ = qkv.shape
        stride_h, stride_w = _pair(self.q_pool.stride) if self.q_pool is not None else (1, 1)
        row_runs = window_runs(height, window_size, stride_h)
        col_runs = window_runs(width, window_size, stride_w)
        pad = self.qkv.bias[self.dim_out :].to(qkv.dtype)  # see forward: no float32 promotion under autocast
        cells = WindowCells.apply(qkv, pad, window_size, row_runs, col_runs)
        attended = []
        for q, k, v in zip(cells[0::3], cells[1::3], cells[2::3]):
            k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (k, v))
            attended.append(F.scaled_dot_product_attention(self._split_heads(q), k, v))

        def tokens() -> Tensor:
            pieces = iter(attended)
            bands = []
            for rows in row_runs:
                band = []
                for cols in col_runs:
                    out_h, out_w = rows.queries // stride_h, cols.queries // stride_w
                    out = self._merge_heads(next(pieces), (batch, rows.count, cols.count, out_h, out_w))
                    band.append(out.transpose(2, 3).reshape(batch, rows.count * out_h, cols.count * out_w, -1))
                bands.append(torch.cat(band, dim=2))
            return torch.cat(bands, dim=1)

        return tokens


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block: (windowed) attention with optional query pooling, then an MLP.

    Args:
        dim: channels in.
        dim_out: channels out; when it differs from `dim` the shortcut is a linear projection of
            the normalised input.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of `dim_out`.
        drop_path: stochastic-depth probability for both residual branches.
        norm_layer: normalisation class, or the name of a `torch.nn` class (built with eps=1e-6).
        q_stride: query (and shortcut) pooling stride; `None` keeps the resolution.
        act_layer: MLP activation class.
        window_size: side of the attention windows in tokens; 0 attends globally.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | str = "LayerNorm",
        q_stride: tuple[int, int] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(norm_layer, str):
            norm_layer = partial(getattr(nn, norm_layer), eps=1e-6)
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = norm_layer(dim)
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride, ceil_mode=False) if q_stride else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads=num_heads, q_pool=self.pool)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim_out)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=act_layer)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """`[B, H, W, dim]` -> `[B, H', W', dim_out]`."""
        # The norms keep their inputs for backward, so their outputs are rebuilt from those
        # rather than kept as the next layers' inputs (sam2.modeling.lean_autograd).
        shortcut = x
        if self.dim != self.dim_out:  # two layers read this norm (see _norm_for_matmuls)
            normed, rebuild_normed = widened_norm(self.norm1, x)
            with rebuilt_in_backward(normed, rebuild_normed):
                shortcut = self.proj(normed)
        else:
            normed, rebuild_normed = _norm_for_matmuls(self.norm1, x)
        if self.pool is not None:
            shortcut = _pool_channels_last(shortcut, self.pool)
        x = shortcut + self.drop_path(self.attn(normed, self.window_size, rebuild_input=rebuild_normed))
        normed, rebuild_normed = _norm_for_matmuls(self.norm2, x)
        with rebuilt_in_backward(normed, rebuild_normed):
            return x + self.drop_path(self.mlp(normed))


def _norm_for_matmuls(norm: nn.Module, x: Tensor) -> tuple[Tensor, Callable[[], Tensor]]:
    """`norm(x)` in the dtype the linear layer reading it computes in, and a function rebuilding it
    bit for bit. Under autocast that is the low-precision copy the layer would otherwise make and
    keep for backward itself (`lean_autograd.autocast_matmul_dtype`). Only for a norm that one
    layer reads: autocast gives each reader its own copy, whose gradients add in float32, and
    one shared copy would add them in its low precision. Where autocast runs the norm in float32
    and `x` is low-precision, `x` is kept rather than its float32 copy (`widened_norm`)."""
    normed, rebuild = widened_norm(norm, x)
    dtype = autocast_matmul_dtype(normed)
    if dtype is None:
        return normed, rebuild
    return normed.to(dtype), lambda: rebuild().to(dtype)


class Hiera(nn.Module):
    """The image trunk: patch embedding, windowed position embedding and `sum(stages)` blocks.

    Args:
        embed_dim: channels of the first stage.
        num_heads: attention heads of the first stage.
        drop_path_rate: stochastic depth of the last block; it rises linearly from 0 at the first.
        q_pool: how many stage transitions (from the first) pool queries by `q_stride`.
        q_stride: pooling stride at those transitions.
        stages: blocks per stage.
        dim_mul: channel multiplier at each stage transition.
        head_mul: head-count multiplier at each stage transition.
        window_pos_embed_bkg_spatial_size: size of the background position embedding, resized
            bicubically to the token grid (https://arxiv.org/abs/2311.05613).
        window_spec: attention window per stage; a stage's first block uses the previous stage's
            window, because its input is still at the previous resolution.
        global_att_blocks: indices of blocks that attend globally instead.
        weights_path: must be `None`; modules here do no file I/O. Load weights with
            `load_state_dict` or the model builder.
        return_interm_layers: return every stage's output, not only the last.

    `channel_list` gives the channels of the returned maps, lowest resolution first (the order
    `FpnNeck.backbone_channel_list` expects).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        drop_path_rate: float = 0.0,
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
        stages: Sequence[int] = (2, 3, 16, 3),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        global_att_blocks: Sequence[int] | None = (12, 16, 20),
        weights_path: str | None = None,
        return_interm_layers: bool = True,
    ) -> None:
        super().__init__()
        _check_config(stages=stages, window_spec=window_spec, q_pool=q_pool, q_stride=q_stride)
        if weights_path is not None:
            raise ValueError(
                f"Hiera(weights_path={weights_path!r}): modules do not read files; drop weights_path and "
                "load the trunk's weights with load_state_dict (or build_sam2's ckpt_path)"
            )
        self.window_spec = tuple(window_spec)
        self.q_stride = tuple(q_stride)
        self.stage_ends = [end - 1 for end in accumulate(stages)]
        self.q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.global_att_blocks = global_att_blocks
        self.window_pos_embed_bkg_spatial_size = tuple(window_pos_embed_bkg_spatial_size)
        self.return_interm_layers = return_interm_layers

        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *self.window_pos_embed_bkg_spatial_size))
        first_window = self.window_spec[0]
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, first_window, first_window))
        self.blocks = self._build_blocks(
            stages, embed_dim=embed_dim, num_heads=num_heads, dim_mul=dim_mul, head_mul=head_mul,
            drop_path_rate=drop_path_rate,
        )
        self._output_blocks = set(self.stage_ends if return_interm_layers else self.stage_ends[-1:])
        self.channel_list = [self.blocks[end].dim_out for end in reversed(self.stage_ends)]
        if not return_interm_layers:
            self.channel_list = self.channel_list[:1]

    def _build_blocks(
        self, stages: Sequence[int], *, embed_dim: int, num_heads: int, dim_mul: float, head_mul: float,
        drop_path_rate: float,
    ) -> nn.ModuleList:
        stage_of_block = [stage for stage, count in enumerate(stages) for _ in range(count)]
        # Built on the CPU so that construction also works under a `meta` default device.
        drop_probs = torch.linspace(0, drop_path_rate, len(stage_of_block), device="cpu").tolist()
        global_blocks = set(self.global_att_blocks or ())
        blocks = nn.ModuleList()
        dim = embed_dim
        for index, stage in enumerate(stage_of_block):
            previous_stage = stage_of_block[max(index - 1, 0)]
            dim_out = dim
            if stage != previous_stage:
                dim_out = int(dim * dim_mul)
                num_heads = int(num_heads * head_mul)
            blocks.append(
                MultiScaleBlock(
                    dim=dim,
                    dim_out=dim_out,
                    num_heads=num_heads,
                    drop_path=drop_probs[index],
                    q_stride=self.q_stride if index in self.q_pool_blocks else None,
                    window_size=0 if index in global_blocks else self.window_spec[previous_stage],
                )
            )
            dim = dim_out
        return blocks

    def _get_pos_embed(self, hw: tuple[int, int]) -> Tensor:
        """Position embedding `[1, H, W, C]`: the resized background plus the tiled window embedding."""
        height, width = hw
        background = resize(self.pos_embed, (height, width), mode="bicubic")
        window = self.pos_embed_window
        # Windows are cut from the top-left corner, so the tiling starts there and is cropped at
        # the padded bottom/right edge.
        repeats = (-(-height // window.shape[-2]), -(-width // window.shape[-1]))
        tiled = window.repeat(1, 1, *repeats)[..., :height, :width]
        return (background + tiled).permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Images `[B, 3, H, W]` -> feature maps `[B, C_s, H / (4 * 2^s), W / (4 * 2^s)]`.

        One map per stage `s` (or only the last, without `return_interm_layers`), highest
        resolution first. The maps are channels-first views of channels-last tensors.
        """
        x = self.patch_embed(x)
        x = x + self._get_pos_embed(x.shape[1:3])
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self._output_blocks:
                features.append(x.permute(0, 3, 1, 2))
        return features

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def get_layer_id(self, layer_name: str) -> int:
        """Depth of a parameter for layer-wise learning-rate decay.

        Embeddings are layer 0, block `i` is layer `i + 1`, anything else sits above the last block.
        """
        top = self.get_num_layers() + 1
        if "rel_pos" in layer_name:
            return top
        if "pos_embed" in layer_name or "patch_embed" in layer_name:
            return 0
        block = re.search(r"blocks\.(\d+)", layer_name)
        return int(block.group(1)) + 1 if block else top


def _check_config(
    *, stages: Sequence[int], window_spec: Sequence[int], q_pool: int, q_stride: Sequence[int]
) -> None:
    if len(stages) != len(window_spec):
        raise ValueError(
            f"Hiera needs one window size per stage: stages={list(stages)} but window_spec={list(window_spec)}"
        )
    if any(count < 1 for count in stages):
        raise ValueError(f"Hiera stages must each hold at least one block, got stages={list(stages)}")
    if not 0 <= q_pool < len(stages):
        raise ValueError(
            f"Hiera q_pool={q_pool} must lie in [0, {len(stages) - 1}] (one per stage transition) "
            f"for stages={list(stages)}"
        )
    # The first block of stages 1..q_pool pools queries inside windows of the previous stage's size.
    for stage in range(q_pool):
        window = window_spec[stage]
        if window and any(window % step for step in q_stride):
            raise ValueError(
                f"Hiera window_spec[{stage}]={window} must be divisible by q_stride={tuple(q_stride)}: "
                f"stage {stage + 1} pools queries inside windows of that size"
            )
