"""SAM's prompt encoder: clicks and boxes become sparse tokens, a mask prompt becomes a dense map."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sam2.modeling.position_encoding import PositionEmbeddingRandom
from sam2.modeling.sam2_utils import LayerNorm2d

# Point labels understood by the prompt encoder. A box is two points with the corner labels.
PADDING_LABEL = -1
NEGATIVE_LABEL = 0
POSITIVE_LABEL = 1
BOX_TOP_LEFT_LABEL = 2
BOX_BOTTOM_RIGHT_LABEL = 3


class PromptEncoder(nn.Module):
    """Embeds point, box and mask prompts for the mask decoder.

    A point's token is the random Fourier encoding of its position plus a learned embedding of
    its label (`point_embeddings[label]` for labels 0-3); padding points (label -1) are replaced by
    `not_a_point_embed`. A mask prompt at `4x` the image-embedding resolution is downscaled by a
    small conv stack; without one, every position gets `no_mask_embed`.

    Args:
        embed_dim: prompt embedding width `C`.
        image_embedding_size: `(H, W)` of the image embedding.
        input_image_size: `(H, W)` of the padded image given to the image encoder, in pixels.
        mask_in_chans: hidden channels of the mask downscaling stack.
        activation: activation class of the mask downscaling stack.
    """

    def __init__(
        self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int],
        mask_in_chans: int, activation: type[nn.Module] = nn.GELU,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        self.num_point_embeddings: int = 4  # negative, positive, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        # Two normalised 2x-strided stages (1 -> mask_in_chans / 4 -> mask_in_chans channels), then a
        # 1x1 projection to the embedding width.
        stages = [
            layer
            for chans_in, chans_out in ((1, mask_in_chans // 4), (mask_in_chans // 4, mask_in_chans))
            for layer in (nn.Conv2d(chans_in, chans_out, kernel_size=2, stride=2), LayerNorm2d(chans_out), activation())
        ]
        self.mask_downscaling = nn.Sequential(*stages, nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        """Positional encoding of the image-embedding grid, `[1, C, H, W]`."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _label_embeddings(self) -> Tensor:
        """`[4, C]`: the learned embedding of labels 0..3, in label order."""
        return torch.cat([embedding.weight for embedding in self.point_embeddings], dim=0)

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """Points `[B, N, 2]` (x, y pixels) with labels `[B, N]` -> tokens `[B, N (+1 if pad), C]`.

        `pad` appends one padding point; the official model does so when no box follows.
        """
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        position = self.pe_layer.forward_with_coords(points, self.input_image_size)

        table = self._label_embeddings()
        known = (labels >= NEGATIVE_LABEL) & (labels <= BOX_BOTTOM_RIGHT_LABEL)
        # Unknown labels (other than the padding label) keep the bare position, as in the official model.
        label_embedding = table[labels.clamp(NEGATIVE_LABEL, BOX_BOTTOM_RIGHT_LABEL).long()] * known.unsqueeze(-1)
        tokens = position + label_embedding
        is_padding = (labels == PADDING_LABEL).unsqueeze(-1)
        return torch.where(is_padding, self.not_a_point_embed.weight.expand_as(tokens), tokens)

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        """Boxes `[B, 4]` (x0, y0, x1, y1 pixels) -> two corner tokens each, `[B, 2, C]`."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        position = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        return position + self._label_embeddings()[BOX_TOP_LEFT_LABEL : BOX_BOTTOM_RIGHT_LABEL + 1]

    @staticmethod
    def _get_batch_size(points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, masks: Tensor | None) -> int:
        """Batch size of the first prompt given (1 if none is)."""
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def _get_device(self) -> torch.device:
        return self.point_embeddings[0].weight.device

    def forward(
        self,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        masks: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Embed the prompts given.

        Args:
            points: coordinates `[B, N, 2]` (x, y in input-image pixels) and labels `[B, N]`
                (-1 padding, 0 negative, 1 positive, 2/3 box corners), or None.
            boxes: `[B, 4]` as (x0, y0, x1, y1) pixels, or None.
            masks: mask logits `[B, 1, 4H, 4W]`, or None.

        Returns:
            sparse embeddings `[B, N_tokens, C]` (points, then box corners) and dense embeddings
            `[B, C, H, W]`.
        """
        batch_size = self._get_batch_size(points, boxes, masks)
        sparse = [torch.empty((batch_size, 0, self.embed_dim), device=self._get_device())]
        if points is not None:
            coords, labels = points
            sparse.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)

        if masks is not None:
            dense_embeddings = self.mask_downscaling(masks)
        else:
            height, width = self.image_embedding_size
            dense_embeddings = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, height, width)
        return sparse_embeddings, dense_embeddings
