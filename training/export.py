"""Turn a training checkpoint into model weights for inference, and prove they work.

    python -m training.export sam2_logs/custom_finetune/checkpoints/checkpoint.pt \
        --model-config sam2.1_hiera_b+ --output sam2_finetuned.pt

writes `{"model": state_dict}` (what `build_sam2(config, ckpt_path)` and the official code load),
reloads it with `build_sam2`, and segments a test image from one click, so a broken export
fails here rather than in your application.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch

from training.utils.checkpoint_utils import save_checkpoint_atomic


def export_weights(checkpoint_path: str, output_path: str) -> int:
    """Writes the slim `{"model": ...}` file; returns the number of tensors."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if "model" not in checkpoint:
        raise KeyError(f"{checkpoint_path} has no 'model' entry (keys: {sorted(checkpoint)}); is it a SAM 2 checkpoint?")
    state_dict = {name: tensor.clone() for name, tensor in checkpoint["model"].items()}
    save_checkpoint_atomic({"model": state_dict}, output_path)
    return len(state_dict)


def check_prediction(
    model_config: str, weights_path: str, *, image_size: int | None = None, device: str = "cpu"
) -> tuple[tuple[int, ...], float]:
    """Loads `weights_path` with build_sam2 and predicts one mask; returns (mask shape, score)."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    overrides = [f"++model.image_size={image_size}"] if image_size else []
    model = build_sam2(model_config, weights_path, device=device, hydra_overrides_extra=overrides)
    side = image_size or 256
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    image[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 230
    predictor = SAM2ImagePredictor(model)
    with torch.inference_mode():
        predictor.set_image(image)
        masks, scores, _ = predictor.predict(
            point_coords=np.array([[side / 2, side / 2]]), point_labels=np.array([1]), multimask_output=False
        )
    return tuple(masks.shape), float(scores[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="training checkpoint (…/checkpoints/checkpoint.pt)")
    parser.add_argument("--model-config", required=True, help="model config the run used, e.g. sam2.1_hiera_b+")
    parser.add_argument("--output", default=None, help="weights file to write (default: <checkpoint>_model.pt)")
    parser.add_argument("--image-size", type=int, default=None, help="scratch.resolution of the run, if not 1024")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        print(f"error: checkpoint {args.checkpoint!r} does not exist", file=sys.stderr)
        return 2
    output = args.output or os.path.splitext(args.checkpoint)[0] + "_model.pt"
    count = export_weights(args.checkpoint, output)
    print(f"wrote {output} ({count} tensors)")
    shape, score = check_prediction(args.model_config, output, image_size=args.image_size, device=args.device)
    print(f"reloaded with build_sam2({args.model_config!r}) and predicted a mask of shape {shape} (score {score:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
