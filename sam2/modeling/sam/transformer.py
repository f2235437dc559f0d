"""Attention layers of SAM 2: the mask decoder's two-way transformer and rotary attention for memories.

`TwoWayTransformer` alternates prompt tokens attending to image tokens and image tokens attending
back to the prompt tokens. `RoPEAttention` adds 2-D axial rotary position encoding and is used by
memory attention, where the keys are several memory frames of the query's grid followed by
object-pointer tokens that carry no grid position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sam2.modeling.position_encoding import AxialRotaryTables, pairs_to_halves, rotate_halves
from sam2.modeling.sam2_utils import MLP


class Attention(nn.Module):
    """Multi-head attention whose projections may narrow the width (`embedding_dim / downsample_rate`).

    Args:
        embedding_dim: width of queries and of the output.
        num_heads: heads; must divide the internal width.
        downsample_rate: internal width is `embedding_dim // downsample_rate`.
        dropout: attention dropout probability, applied only in training.
        kv_in_dim: width of keys and values if it differs from `embedding_dim`.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must divide the internal width embedding_dim // downsample_rate "
                f"({embedding_dim} // {downsample_rate} = {self.internal_dim})"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.dropout_p = dropout

    def _project_to_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`[B, N, C_in]` inputs -> `[B, heads, N, C_internal / heads]` projections."""
        return (
            self.q_proj(q).unflatten(-1, (self.num_heads, -1)).transpose(1, 2),
            self.k_proj(k).unflatten(-1, (self.num_heads, -1)).transpose(1, 2),
            self.v_proj(v).unflatten(-1, (self.num_heads, -1)).transpose(1, 2),
        )

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Per-head attention `[B, heads, N, c]` -> output projection `[B, N, embedding_dim]`."""
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Queries `[B, Nq, embedding_dim]`, keys/values `[B, Nk, kv_in_dim]` -> `[B, Nq, embedding_dim]`."""
        return self._attend(*self._project_to_heads(q, k, v))


class RoPEAttention(Attention):
    """`Attention` with 2-D axial rotary position encoding on queries and keys.

    Queries are the tokens of one square (or `feat_sizes`) grid, row by row. Keys are either the
    same grid or, with `rope_k_repeat`, several grids of the same size one after another (memory
    frames); the last `num_k_exclude_rope` keys (object pointers) are left unrotated.

    Args:
        rope_theta: frequency base of the rotation.
        rope_k_repeat: allow keys that hold several copies of the query grid.
        feat_sizes: (width, height) of the expected grid; other query lengths must be square.
        Other arguments as for `Attention`.
    """

    def __init__(
        self,
        *args,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        feat_sizes: Sequence[int] = (64, 64),
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.rope_k_repeat = rope_k_repeat
        self.feat_sizes = (int(feat_sizes[0]), int(feat_sizes[1]))
        self.rope = AxialRotaryTables(self.internal_dim // self.num_heads, theta=rope_theta)

    def _grid_size(self, num_tokens: int) -> tuple[int, int]:
        """(width, height) of the grid whose tokens the queries are."""
        width, height = self.feat_sizes
        if num_tokens == width * height:
            return width, height
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"RoPEAttention got {num_tokens} query tokens: not feat_sizes {self.feat_sizes} and not a square "
                "grid; set feat_sizes to the (width, height) of the feature map"
            )
        return side, side

    def _project_to_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As `Attention`'s, with query and key channels in the halves order `rotate_halves` takes.

        The rows of both projections are reordered alike (a copy of the weights, not of the
        activations), so the attention scores are those of the official channel order.
        A projection that is not a plain `nn.Linear` (an adapter, a hooked layer) runs as it
        is and its output channels are reordered instead.
        """
        head_dim = self.rope.head_dim

        def project(linear: nn.Module, x: Tensor) -> Tensor:
            if type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks):
                bias = None if linear.bias is None else pairs_to_halves(linear.bias, head_dim)
                out = F.linear(x, pairs_to_halves(linear.weight, head_dim, dim=0), bias)
            else:
                out = pairs_to_halves(linear(x), head_dim)
            return out.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        v = self.v_proj(v).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        return project(self.q_proj, q), project(self.k_proj, k), v

    def forward(self, q: Tensor, k: Tensor, v: Tensor, num_k_exclude_rope: int = 0) -> Tensor:
        """Queries `[B, Nq, C]`, keys/values `[B, Nk, kv_in_dim]` -> `[B, Nq, C]`.

        `num_k_exclude_rope`: how many trailing keys carry no grid position and stay unrotated.
        """
        q, k, v = self._project_to_heads(q, k, v)
        num_queries, num_keys = q.shape[-2], k.shape[-2]
        if num_keys != num_queries and not self.rope_k_repeat:
            raise ValueError(
                f"{num_keys} keys for {num_queries} queries: keys spanning several grids need rope_k_repeat=True"
            )
        cos, sin = self.rope.get(*self._grid_size(num_queries), device=q.device)
        q = rotate_halves(q, cos, sin)
        num_k_rope = num_keys - num_k_exclude_rope
        if num_k_rope > 0:
            if num_k_rope % num_queries != 0:
                raise ValueError(
                    f"{num_k_rope} rotated keys ({num_keys} minus num_k_exclude_rope={num_k_exclude_rope}) are not "
                    f"a whole number of {num_queries}-token grids"
                )
            # Each memory frame's keys turn like the queries: one grid's tables, broadcast over frames.
            k = rotate_halves(k, cos, sin, num_rotated=num_k_rope)
        return self._attend(q, k, v)


class TwoWayAttentionBlock(nn.Module):
    """One round of prompt tokens <-> image tokens exchange.

    Four steps, each residual then LayerNorm: token self-attention (`norm1`), tokens attend to
    the image (`norm2`), token MLP (`norm3`), image attends to the tokens (`norm4`). Positional
    encodings are added to queries and keys (never values); the first block skips them in
    self-attention, whose input is then the bare prompt embedding.
    """

    def __init__(
        self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048, activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2, activation=activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens `[B, Nt, C]` and image tokens `[B, HW, C]` with their encodings -> updated (tokens, image)."""
        if self.skip_first_layer_pe:
            # The first block's tokens are the prompt embeddings themselves, so their update replaces them.
            queries = self.norm1(self.self_attn(q=queries, k=queries, v=queries))
        else:
            q = queries + query_pe
            queries = self.norm1(queries + self.self_attn(q=q, k=q, v=queries))

        keys_with_pe = keys + key_pe
        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=keys_with_pe, v=keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=keys_with_pe, k=q, v=queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """The mask decoder's transformer: `depth` two-way blocks, then a last token-to-image attention.

    Args:
        depth: number of `TwoWayAttentionBlock`s.
        embedding_dim: token and image channel width `C`.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLP.
        activation: MLP activation class.
        attention_downsample_rate: internal width divisor of the cross-attentions.
    """

    def __init__(
        self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(index == 0),
            )
            for index in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """Run the decoder transformer.

        Args:
            image_embedding: `[B, C, H, W]` image features.
            image_pe: `[B, C, H, W]` their positional encoding.
            point_embedding: `[B, Nt, C]` output and prompt tokens; also their positional encoding.

        Returns:
            tokens `[B, Nt, C]` and image tokens `[B, H * W, C]`.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)

        attn_out = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
        return self.norm_final_attn(queries + attn_out), keys
