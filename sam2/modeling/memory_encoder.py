"""The memory encoder: turns a frame's features and its predicted mask into a memory entry.

The mask (logits at image resolution) is brought down to the feature stride by a small strided
conv stack, added to a projection of the frame's features, mixed by a few ConvNeXt blocks and
projected to the (usually narrower) memory width. Attribute names (`encoder.<i>`, `dwconv`,
`pwconv1`, `gamma`, `layers.<i>`, `pix_feat_proj`, `out_proj`) are the official checkpoint names.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sam2.modeling.lean_autograd import rebuilt_activation
from sam2.modeling.sam2_utils import DropPath, LayerNorm2d, get_clones


class MaskDownSampler(nn.Module):
    """Reduces a `[B, 1, H, W]` mask to `[B, embed_dim, H / total_stride, W / total_stride]`.

    Each stage is a strided conv that trades spatial size for channels (x `stride**2`), followed
    by a per-pixel LayerNorm and the activation; a final 1x1 conv maps to `embed_dim`. All layers
    sit in one `nn.Sequential` named `encoder` so the checkpoint keys are `encoder.<index>.*`.

    Args:
        embed_dim: output channels.
        kernel_size, stride, padding: of every downsampling conv.
        total_stride: overall downsampling; must be a power of `stride`.
        activation: activation class, instantiated once per stage.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 4,
        stride: int = 4,
        padding: int = 0,
        total_stride: int = 16,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        num_stages = int(math.log2(total_stride) // math.log2(stride))
        if stride**num_stages != total_stride:
            raise ValueError(
                f"MaskDownSampler needs total_stride to be a power of stride, got "
                f"total_stride={total_stride}, stride={stride}; e.g. use stride=2 or stride=4 with total_stride=16"
            )
        self.encoder = nn.Sequential()
        channels = 1
        for _ in range(num_stages):
            widened = channels * stride**2
            self.encoder.append(nn.Conv2d(channels, widened, kernel_size, stride=stride, padding=padding))
            self.encoder.append(LayerNorm2d(widened))
            self.encoder.append(activation())
            channels = widened
        self.encoder.append(nn.Conv2d(channels, embed_dim, kernel_size=1))

    def forward(self, masks: Tensor) -> Tensor:
        """`[B, 1, H, W]` -> `[B, embed_dim, H / total_stride, W / total_stride]`."""
        return self.encoder(masks)


class CXBlock(nn.Module):
    """A ConvNeXt block: depthwise conv, LayerNorm, inverted-bottleneck MLP, scaled residual.

    The 1x1 convs of the MLP are `nn.Linear` layers applied channels-last, as in the official
    weights (`pwconv1`/`pwconv2` hold linear weights of shape `[4 * dim, dim]`/`[dim, 4 * dim]`).

    Args:
        dim: channels in and out.
        kernel_size, padding: of the spatial conv.
        drop_path: stochastic-depth rate of the residual branch.
        layer_scale_init_value: initial value of the per-channel `gamma`; <= 0 disables it.
        use_dwconv: depthwise (one group per channel) rather than dense spatial conv.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        padding: int = 3,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        use_dwconv: bool = True,
    ) -> None:
        super().__init__()
        groups = dim if use_dwconv else 1
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=groups)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # Layer scale starts the residual branch near zero so deep stacks begin as identities.
        self.gamma = (
            nn.Parameter(torch.full((dim,), float(layer_scale_init_value))) if layer_scale_init_value > 0 else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """`[B, dim, H, W]` -> `[B, dim, H, W]`."""
        spatial = x.contiguous(memory_format=torch.channels_last) if _channels_last_pays(x) else x
        branch = self.norm(self.dwconv(spatial)).permute(0, 2, 3, 1)
        hidden = self.pwconv1(branch)
        activated = self.act(hidden)
        # The widest tensor (4 * dim channels): rebuilt in backward rather than kept for pwconv2.
        with rebuilt_activation(self.act, hidden, activated):
            branch = self.pwconv2(activated)
        if self.gamma is not None:
            branch = branch * self.gamma
        return x + self.drop_path(branch.permute(0, 3, 1, 2))


def _channels_last_pays(x: Tensor) -> bool:
    """Training in float32 on the CPU, where oneDNN's depthwise conv backward runs ~2.4x faster on a
    channels-last input (the forward takes the same time, and its channels-last output then goes
    into the MLP without a copy). Elsewhere the layout stays: bfloat16 kernels round differently
    per layout, and inference has no backward to speed up."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )


class Fuser(nn.Module):
    """An optional 1x1 input projection followed by `num_layers` copies of `layer`.

    Args:
        layer: the block to repeat (deep-copied, so copies do not share weights).
        num_layers: number of copies, stored as `layers.<i>`.
        dim: channels; required only with `input_projection`.
        input_projection: add a 1x1 conv `proj` before the blocks.
    """

    def __init__(self, layer: nn.Module, num_layers: int, dim: int | None = None, input_projection: bool = False):
        super().__init__()
        if input_projection and dim is None:
            raise ValueError("Fuser(input_projection=True) needs `dim`, the channel count of its input")
        self.proj = nn.Conv2d(dim, dim, kernel_size=1) if input_projection else nn.Identity()
        self.layers = get_clones(layer, num_layers)

    def forward(self, x: Tensor) -> Tensor:
        """`[B, C, H, W]` -> `[B, C, H, W]`."""
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Encodes one frame's features together with its mask into memory features.

    Args:
        out_dim: channels of the memory features (`mem_dim` of the tracker).
        mask_downsampler: maps `[B, 1, H, W]` masks to `[B, in_dim, h, w]`.
        fuser: mixes the sum of features and mask embedding, `[B, in_dim, h, w]` in and out.
        position_encoding: maps `[B, out_dim, h, w]` to its positional encoding of the same shape.
        in_dim: channels of the frame features.
    """

    def __init__(
        self,
        out_dim: int,
        mask_downsampler: nn.Module,
        fuser: nn.Module,
        position_encoding: nn.Module,
        in_dim: int = 256,
    ) -> None:
        super().__init__()
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = fuser
        self.position_encoding = position_encoding
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()

    def forward(
        self, pix_feat: Tensor, masks: Tensor, skip_mask_sigmoid: bool = False
    ) -> dict[str, Tensor | list[Tensor]]:
        """Memory features and their positional encoding.

        Args:
            pix_feat: frame features `[B, in_dim, h, w]`.
            masks: mask logits `[B, 1, H, W]` with `H = h * total_stride`; with
                `skip_mask_sigmoid` they are used as given (already probabilities or scaled logits).
            skip_mask_sigmoid: do not squash `masks` through a sigmoid first.

        Returns:
            `{"vision_features": [B, out_dim, h, w], "vision_pos_enc": [pos]}`, `pos` of the same
            shape and dtype as the features.
        """
        if not skip_mask_sigmoid:
            # Predicted logits and binary ground truth then look alike to the encoder.
            masks = torch.sigmoid(masks)
        mask_embedding = self.mask_downsampler(masks)
        # Features may have been offloaded to another device than the masks.
        fused = self.pix_feat_proj(pix_feat.to(mask_embedding.device)) + mask_embedding
        features = self.out_proj(self.fuser(fused))
        pos = self.position_encoding(features).to(features.dtype)
        return {"vision_features": features, "vision_pos_enc": [pos]}
