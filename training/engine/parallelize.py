"""Speed and memory switches applied to a built model from outside (torchtitan's `parallelize`).

The model's modules stay plain: no checkpointing or compilation inside them. Here the trainer
turns on, by config, for an already-built `SAM2Base`/`SAM2Train`:

- activation checkpointing (`torch.utils.checkpoint`, non-reentrant) of every Hiera block and/or
  every memory-attention layer: their activations are recomputed during backward instead of
  kept, trading one extra forward of those parts for memory. Dropout and drop-path draw the
  same random masks in the recomputation (checkpoint restores the RNG state), so outputs and
  gradients are unchanged;
- `torch.compile` of the image encoder (the official `compile_image_encoder` flag, read from
  the model), optionally of the memory attention, and of any other named parts (the heads that
  run once per frame or click: prompt encoder, mask decoder, memory encoder).

Both patch only the instance's `forward` (`nn.Module.compile` for compilation), so parameter
names, state dicts and checkpoints are exactly those of the plain model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

# Names accepted in `activation_checkpointing`, and where their repeated blocks live.
CHECKPOINTABLE_PARTS = {
    "image_encoder": ("image_encoder", "trunk", "blocks"),
    "memory_attention": ("memory_attention", "layers"),
}


class CheckpointedForward:
    """An instance-level `forward` that runs the class's forward under activation checkpointing.

    Kept as an object (not a closure) so that deep copies (EMA models, `copy.deepcopy`) and
    pickling keep working: the copy checkpoints its own module. Without autograd (eval,
    `torch.no_grad`) the plain forward runs, since there is nothing to save memory on.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        plain_forward = type(self.module).forward
        if not torch.is_grad_enabled():
            return plain_forward(self.module, *args, **kwargs)
        return torch.utils.checkpoint.checkpoint(plain_forward, self.module, *args, use_reentrant=False, **kwargs)


def checkpoint_modules(modules: Iterable[nn.Module]) -> int:
    """Activation-checkpoint each module's forward in place; returns how many were wrapped."""
    count = 0
    for module in modules:
        if not isinstance(module.__dict__.get("forward"), CheckpointedForward):
            module.forward = CheckpointedForward(module)
            count += 1
    return count


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), CheckpointedForward)


def _repeated_blocks(model: nn.Module, part: str) -> nn.ModuleList:
    if part not in CHECKPOINTABLE_PARTS:
        raise ValueError(
            f"activation_checkpointing names {part!r}; choose among {sorted(CHECKPOINTABLE_PARTS)} "
            "(or true for all of them)"
        )
    blocks: Any = model
    path = CHECKPOINTABLE_PARTS[part]
    for attr in path:
        blocks = getattr(blocks, attr, None)
        if blocks is None:
            raise ValueError(
                f"cannot checkpoint {part!r}: the model has no `{'.'.join(path)}` "
                f"(a {type(model).__name__}); drop {part!r} from activation_checkpointing"
            )
    return blocks


def _checkpoint_parts(activation_checkpointing: bool | str | Iterable[str] | None) -> list[str]:
    if activation_checkpointing is None or activation_checkpointing is False:
        return []
    if activation_checkpointing is True:
        return list(CHECKPOINTABLE_PARTS)
    if isinstance(activation_checkpointing, str):
        return [activation_checkpointing]
    return list(activation_checkpointing)


def _compile_in_place(module: nn.Module, options: Mapping[str, Any]) -> None:
    # nn.Module.compile keeps the module (and its parameter names) and compiles its call.
    module.compile(**dict(options))


def apply_training_optimizations(
    model: nn.Module,
    *,
    activation_checkpointing: bool | str | Iterable[str] | None = False,
    compile_image_encoder: bool | None = None,
    compile_memory_attention: bool = False,
    compile_modules: str | Iterable[str] = (),
    compile_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Apply the configured fast paths and memory switches to `model` in place; returns it.

    Call it on the bare model, after moving it to its device and before DDP wraps it.

    Args:
        model: a `SAM2Base` (or `SAM2Train`): `image_encoder.trunk.blocks`,
            `memory_attention.layers`.
        activation_checkpointing: `True` for all of `"image_encoder"` (every Hiera block) and
            `"memory_attention"` (every memory-attention layer), or a list of those names;
            `False`/`None`/`[]` for none.
        compile_image_encoder: `torch.compile` the image encoder; `None` follows the model's
            own `compile_image_encoder` flag (the official config key).
        compile_memory_attention: `torch.compile` the memory attention (its memory length
            varies between frames, so the default options compile it with dynamic shapes).
        compile_modules: names of further parts of `model` (its direct children, e.g.
            `sam_mask_decoder`, `sam_prompt_encoder`, `memory_encoder`) to `torch.compile`. With
            static shapes by default: one graph per input layout (prompt kind and count, objects),
            up to torch's recompile limit, past which a part runs eagerly. (With dynamic shapes,
            inductor in torch 2.14 failed a stride assertion in the mask decoder's backward
            once the number of prompt tokens changed.)
        compile_options: keyword arguments for `torch.compile` (e.g. `{"mode": "max-autotune"}`).
    """
    for part in _checkpoint_parts(activation_checkpointing):
        checkpoint_modules(_repeated_blocks(model, part))

    if compile_image_encoder is None:
        compile_image_encoder = bool(getattr(model, "compile_image_encoder", False))
    options = dict(compile_options or {})
    if compile_image_encoder:
        _compile_in_place(model.image_encoder, {"dynamic": False, **options})
    if compile_memory_attention:
        if getattr(model, "memory_attention", None) is None:
            raise ValueError("compile_memory_attention is set but the model has no memory_attention")
        _compile_in_place(model.memory_attention, {"dynamic": True, **options})
    parts = dict(model.named_children())
    for name in [compile_modules] if isinstance(compile_modules, str) else compile_modules:
        if name in ("image_encoder", "memory_attention"):
            raise ValueError(f"compile_modules names {name!r}: use its own switch, compile_{name}")
        if name not in parts:
            raise ValueError(
                f"compile_modules names {name!r}, which is not a part of {type(model).__name__}; "
                f"its parts are {sorted(parts)}"
            )
        _compile_in_place(parts[name], {"dynamic": False, **options})
    return model
