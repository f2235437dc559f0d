"""The image encoder: a multi-scale trunk (Hiera) followed by a light FPN neck.

The neck projects every trunk level to `d_model` channels and, on chosen levels, adds the
upsampled result of the coarser level above it (top-down fusion). Each output level also gets a
position encoding of its own size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# F.interpolate accepts `align_corners` only for these modes.
_CORNER_ALIGNABLE_MODES = frozenset({"linear", "bilinear", "bicubic", "trilinear"})


class ImageEncoder(nn.Module):
    """Trunk + neck, returning the features SAM 2 consumes.

    Args:
        trunk: maps images to feature maps, highest resolution first, and exposes `channel_list`
            (lowest resolution first).
        neck: an `FpnNeck` whose `backbone_channel_list` equals the trunk's `channel_list`.
        scalp: number of lowest-resolution levels to discard after the neck.
    """

    def __init__(self, trunk: nn.Module, neck: nn.Module, scalp: int = 0) -> None:
        super().__init__()
        trunk_channels, neck_channels = list(trunk.channel_list), list(neck.backbone_channel_list)
        if trunk_channels != neck_channels:
            raise ValueError(
                f"the neck expects trunk channels {neck_channels} (backbone_channel_list), but the trunk "
                f"produces {trunk_channels} (channel_list, lowest resolution first); make them equal"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, sample: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """Encode images `[B, 3, H, W]`.

        Returns:
            A dict with
            - "backbone_fpn": neck outputs `[B, d_model, H_l, W_l]`, highest resolution first, the
              `scalp` coarsest levels dropped;
            - "vision_pos_enc": a position encoding per kept level, same shapes;
            - "vision_features": the coarsest kept level, `backbone_fpn[-1]`.
        """
        features, pos = self.neck(self.trunk(sample))
        if self.scalp > 0:
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}


class FpnNeck(nn.Module):
    """Feature-pyramid neck without output convolutions.

    Args:
        position_encoding: module mapping a `[B, d_model, H, W]` map to its position encoding.
        d_model: channels of every output level.
        backbone_channel_list: trunk channels per level, lowest resolution first.
        kernel_size, stride, padding: of the lateral convolutions.
        fpn_interp_model: `F.interpolate` mode for the 2x top-down upsampling.
        fuse_type: "sum" adds lateral and top-down features, "avg" averages them.
        fpn_top_down_levels: levels (0 = highest resolution) that receive top-down features;
            the others output their lateral projection alone. `None` means all levels.
    """

    def __init__(
        self, position_encoding: nn.Module, d_model: int, backbone_channel_list: Sequence[int],
        # The lateral convolutions.
        kernel_size: int = 1, stride: int = 1, padding: int = 0,
        # The top-down path.
        fpn_interp_model: str = "bilinear", fuse_type: str = "sum", fpn_top_down_levels: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"FpnNeck fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.position_encoding = position_encoding
        self.d_model = d_model
        self.backbone_channel_list = backbone_channel_list
        # convs[j] projects the j-th coarsest level; each sits in a Sequential as `conv` so that
        # checkpoint names read `convs.<j>.conv.weight`.
        self.convs = nn.ModuleList(
            nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(channels, d_model, kernel_size=kernel_size, stride=stride, padding=padding)
                )
            )
            for channels in backbone_channel_list
        )
        self.fpn_interp_model = fpn_interp_model
        self.fuse_type = fuse_type
        levels = range(len(backbone_channel_list)) if fpn_top_down_levels is None else fpn_top_down_levels
        self.fpn_top_down_levels = list(levels)

    def _upsample(self, x: Tensor) -> Tensor:
        align = False if self.fpn_interp_model in _CORNER_ALIGNABLE_MODES else None
        # Upsampled in float32, as the official neck does, so results agree under autocast too.
        return F.interpolate(
            x.to(dtype=torch.float32), scale_factor=2.0, mode=self.fpn_interp_model,
            align_corners=align, antialias=False,
        )

    def forward(self, xs: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Trunk maps `[B, C_l, H_l, W_l]` (highest resolution first) -> (features, position encodings).

        Both returned lists hold `[B, d_model, H_l, W_l]` per level, highest resolution first.
        """
        num_levels = len(self.convs)
        if len(xs) != num_levels:
            raise ValueError(f"FpnNeck was built for {num_levels} trunk levels but got {len(xs)} feature maps")
        features: list[Tensor] = [None] * num_levels  # type: ignore[list-item]
        pos: list[Tensor] = [None] * num_levels  # type: ignore[list-item]
        coarser = None
        for level in reversed(range(num_levels)):
            lateral = self.convs[num_levels - 1 - level](xs[level])
            if coarser is not None and level in self.fpn_top_down_levels:
                fused = lateral + self._upsample(coarser)
                coarser = fused / 2 if self.fuse_type == "avg" else fused
            else:
                coarser = lateral
            features[level] = coarser
            pos[level] = self.position_encoding(coarser).to(coarser.dtype)
        return features, pos
