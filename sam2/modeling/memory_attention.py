"""Memory attention: conditions the current frame's features on the memory bank.

A stack of pre-norm transformer layers. Each layer lets the current frame's tokens attend to each
other, then to the memory tokens (spatial memories of past frames, followed by object-pointer
tokens), then applies a feed-forward block. Attribute names (`self_attn`, `cross_attn_image`,
`linear1`, `norm1`..`norm3`, `layers.<i>`, `norm`) are the official checkpoint names.
"""

from __future__ import annotations

import contextlib

from torch import Tensor, nn

from sam2.modeling import lean_autograd
from sam2.modeling.sam.transformer import RoPEAttention
from sam2.modeling.sam2_utils import get_activation_fn, get_clones


def _add_pos(x: Tensor, pos: Tensor | None, enabled: bool) -> Tensor:
    return x + pos if enabled and pos is not None else x


class MemoryAttentionLayer(nn.Module):
    """Self-attention, cross-attention to memory, feed-forward; each pre-normed with a residual.

    Tensors are batch-first here: current tokens `[B, N, d_model]`, memory `[B, M, kv_dim]`.

    Args (keyword-only):
        d_model: width of the current tokens.
        self_attention: attention among the current tokens.
        cross_attention: attention from current tokens (queries) to memory (keys/values).
        dim_feedforward: hidden width of the feed-forward block.
        activation: name of the feed-forward activation (`relu`, `gelu`, `glu`).
        dropout: dropout on each residual branch and inside the feed-forward block (training only).
        pos_enc_at_attn: add the query positional encoding to self-attention queries and keys.
        pos_enc_at_cross_attn_queries: add the query positional encoding to cross-attention queries.
        pos_enc_at_cross_attn_keys: add the memory positional encoding to cross-attention keys.
    """

    def __init__(
        self,
        *,
        d_model: int,
        self_attention: nn.Module,
        cross_attention: nn.Module,
        dim_feedforward: int,
        activation: str,
        dropout: float,
        pos_enc_at_attn: bool,
        pos_enc_at_cross_attn_queries: bool,
        pos_enc_at_cross_attn_keys: bool,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys

        # Registration order fixes the state-dict and optimizer-state order, which must follow the
        # official checkpoints: attention, feed-forward, then the norms.
        self.self_attn = self_attention
        self.cross_attn_image = cross_attention
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = get_activation_fn(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))

    def _self_attend(self, tgt: Tensor, query_pos: Tensor | None) -> Tensor:
        normed = self.norm1(tgt)
        q_and_k = _add_pos(normed, query_pos, self.pos_enc_at_attn)
        return tgt + self.dropout1(self.self_attn(q_and_k, q_and_k, v=normed))

    def _cross_attend(
        self, tgt: Tensor, memory: Tensor, query_pos: Tensor | None, pos: Tensor | None, num_k_exclude_rope: int
    ) -> Tensor:
        # Only rotary attention knows about tokens to leave unrotated; plain attention gets none.
        extra = {"num_k_exclude_rope": num_k_exclude_rope} if num_k_exclude_rope > 0 else {}
        normed = self.norm2(tgt)
        attended = self.cross_attn_image(
            q=_add_pos(normed, query_pos, self.pos_enc_at_cross_attn_queries),
            k=_add_pos(memory, pos, self.pos_enc_at_cross_attn_keys),
            v=memory,
            **extra,
        )
        return tgt + self.dropout2(attended)

    def _feed_forward(self, tgt: Tensor) -> Tensor:
        activated = self.activation(self.linear1(self.norm3(tgt)))
        hidden, rebuild = lean_autograd.dropout(activated, self.dropout.p, self.training)
        # The second layer's input is rebuilt in backward from the activation and the mask.
        with lean_autograd.rebuilt_in_backward(hidden, rebuild) if rebuild else contextlib.nullcontext():
            out = self.linear2(hidden)
        return tgt + self.dropout3(out)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
        num_k_exclude_rope: int = 0,
    ) -> Tensor:
        """Updated current tokens `[B, N, d_model]`.

        Args:
            tgt: current tokens `[B, N, d_model]`.
            memory: memory tokens `[B, M, kv_dim]`; the last `num_k_exclude_rope` of them get no
                rotary encoding (object pointers have no spatial position).
            pos: memory positional encoding, like `memory`.
            query_pos: current-token positional encoding, like `tgt`.
            num_k_exclude_rope: trailing memory tokens exempt from rotary encoding.
        """
        tgt = self._self_attend(tgt, query_pos)
        tgt = self._cross_attend(tgt, memory, query_pos, pos, num_k_exclude_rope)
        return self._feed_forward(tgt)


def _single(x: Tensor | list[Tensor] | None, name: str) -> Tensor | None:
    """Unwraps the one-level feature list that the tracker passes."""
    if not isinstance(x, (list, tuple)):
        return x
    if len(x) != 1:
        raise ValueError(f"MemoryAttention takes a single feature level, got a list of {len(x)} for `{name}`")
    return x[0]


def _swap_batch_and_sequence(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.transpose(0, 1)


class MemoryAttention(nn.Module):
    """Stack of `MemoryAttentionLayer`s with a final LayerNorm; inputs and outputs sequence-first.

    Args:
        d_model: width of the current-frame tokens.
        pos_enc_at_input: add `0.1 * curr_pos` to the current tokens before the first layer.
        layer: the layer to repeat (deep-copied into `layers.<i>`).
        num_layers: number of layers.
        batch_first: the layers expect `[B, L, C]` (the sequence-first inputs are transposed).
    """

    def __init__(
        self,
        d_model: int,
        pos_enc_at_input: bool,
        layer: nn.Module,
        num_layers: int,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        self.layers = get_clones(layer, num_layers)
        self.norm = nn.LayerNorm(d_model)
        self.d_model, self.num_layers = d_model, num_layers
        self.pos_enc_at_input = pos_enc_at_input
        self.batch_first = batch_first

    def forward(
        self,
        curr: Tensor | list[Tensor],
        memory: Tensor,
        curr_pos: Tensor | list[Tensor] | None = None,
        memory_pos: Tensor | None = None,
        num_obj_ptr_tokens: int = 0,
    ) -> Tensor:
        """Current-frame tokens conditioned on memory, `[N, B, d_model]`.

        Args:
            curr: current-frame tokens `[N, B, d_model]` (N = h * w), or a one-element list of it.
            memory: memory tokens `[M, B, kv_dim]`: spatial memories of all frames, then
                `num_obj_ptr_tokens` object-pointer tokens.
            curr_pos: positional encoding of `curr`, same form.
            memory_pos: positional encoding of `memory`, `[M, B, kv_dim]`.
            num_obj_ptr_tokens: trailing memory tokens that are object pointers.
        """
        curr, curr_pos = _single(curr, "curr"), _single(curr_pos, "curr_pos")
        if curr.shape[1] != memory.shape[1]:
            raise ValueError(
                f"curr and memory must share the batch size (dim 1, sequence-first), got "
                f"curr {tuple(curr.shape)} and memory {tuple(memory.shape)}"
            )
        output = curr
        if self.pos_enc_at_input and curr_pos is not None:
            output = output + 0.1 * curr_pos
        if self.batch_first:
            output, curr_pos = output.transpose(0, 1), _swap_batch_and_sequence(curr_pos)
            memory, memory_pos = memory.transpose(0, 1), _swap_batch_and_sequence(memory_pos)

        for layer in self.layers:
            # The reference passes the pointer count only to rotary cross-attention.
            rope_exclude = num_obj_ptr_tokens if isinstance(layer.cross_attn_image, RoPEAttention) else 0
            output = layer(
                tgt=output, memory=memory, pos=memory_pos, query_pos=curr_pos, num_k_exclude_rope=rope_exclude
            )

        output = self.norm(output)
        return output.transpose(0, 1) if self.batch_first else output
