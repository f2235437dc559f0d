"""`torch.compile` for the per-frame components of the video predictor (the official "VOS" setting).

Only the components' `forward` methods are compiled, so parameter names (and checkpoints) stay
as they are. Compiled graphs in "max-autotune" mode may reuse their output buffers on the next
call (CUDA graphs), so every tensor the session keeps across frames is cloned on the way out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# component attribute -> whether its input shapes change from call to call (the memory grows)
_COMPILED_COMPONENTS = {
    "memory_encoder": False,
    "memory_attention": True,
    "sam_prompt_encoder": False,
    "sam_mask_decoder": False,
}


class CompiledComponentsMixin:
    """Compiles the memory encoder, memory attention and SAM heads at construction; mixed in
    before a `SAM2VideoPredictor`. The first frames are slow while graphs compile."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        print("Compiling all components for VOS setting. First time may be very slow.")
        components = dict(_COMPILED_COMPONENTS)
        if self.compile_image_encoder:
            # The model only records the flag; compiling is the runner's job.
            components["image_encoder"] = False
        for name, dynamic in components.items():
            module = getattr(self, name)
            module.forward = torch.compile(module.forward, mode="max-autotune", fullgraph=True, dynamic=dynamic)

    def forward_image(self, img_batch: Tensor) -> dict[str, Any]:
        backbone_out = super().forward_image(img_batch)
        backbone_out["backbone_fpn"] = [feat.clone() for feat in backbone_out["backbone_fpn"]]
        backbone_out["vision_pos_enc"] = [pos.clone() for pos in backbone_out["vision_pos_enc"]]
        return backbone_out

    def _forward_sam_heads(self, *args: Any, **kwargs: Any) -> Any:
        outputs = super()._forward_sam_heads(*args, **kwargs)
        cloned = [value.clone() for value in outputs]
        return type(outputs)(*cloned) if hasattr(outputs, "_fields") else tuple(cloned)

    def _encode_new_memory(self, *args: Any, **kwargs: Any) -> tuple[Tensor, list[Tensor]]:
        maskmem_features, maskmem_pos_enc = super()._encode_new_memory(*args, **kwargs)
        return maskmem_features.clone(), [pos.clone() for pos in maskmem_pos_enc]
