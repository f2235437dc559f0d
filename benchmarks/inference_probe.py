"""Child process for bench_inference.py: times one side's predictors through the public API.

The same file runs for ours and for the reference: whichever `sam2` is first on `PYTHONPATH` is
measured, through the official entry points both provide (`build_sam2`, `SAM2ImagePredictor`,
`build_sam2_video_predictor`, `init_state`, `add_new_mask`, `propagate_in_video`).

    python benchmarks/inference_probe.py --config configs/sam2.1/sam2.1_hiera_t.yaml \
        --weights w.pt --video-dir frames/ --masks masks.npy --out probe.json

Phases, each with its own peak memory: the image predictor's `set_image` (image embedding) and a
point `predict`; then per repetition a fresh `init_state` (frame loading), `add_new_mask` for each
object on frame 0, and `propagate_in_video` over all frames (timed alone, for frames/s).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# This file is run as a script: its folder is sys.path[0]. It must import the side's `sam2`, and
# only the side-neutral helpers from common.py (loaded by path, not as `benchmarks.common`).
sys.path.pop(0)
_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def size_overrides(image_size: int | None) -> list[str]:
    """Hydra overrides that run the model at `image_size` (RoPE tables sized to match)."""
    if not image_size:
        return []
    feat = image_size // 16
    layer = "++model.memory_attention.layer"
    return [
        f"++model.image_size={image_size}",
        f"{layer}.self_attention.feat_sizes=[{feat},{feat}]",
        f"{layer}.cross_attention.feat_sizes=[{feat},{feat}]",
    ]


@contextlib.contextmanager
def phase(record: dict, name: str, device: str) -> Iterator[None]:
    """Records the peak memory reached inside the block as `record["peak_<name>"]`."""
    common.reset_peak_memory(device)
    yield
    common.sync_device()
    record[f"peak_{name}"] = common.peak_memory_bytes(device)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one device-synced call."""
    common.sync_device()
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    common.sync_device()
    return time.perf_counter() - start, time.process_time() - cpu_start


def bench_image(args: argparse.Namespace, record: dict, autocast: Callable) -> None:
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    # The official image predictor is fixed to 1024 px inputs (its feature sizes are constants).
    model = build_sam2(args.config, args.weights, device=args.device, apply_postprocessing=False)
    predictor = SAM2ImagePredictor(model)
    frames = sorted(Path(args.video_dir).glob("*.jpg"))
    image = np.asarray(Image.open(frames[0]).convert("RGB"))
    height, width = image.shape[:2]
    point = np.array([[width // 4, height // 2]], dtype=np.float32)
    with phase(record, "image", args.device), torch.inference_mode(), autocast():
        record["embed_cpu_s"] = []
        record["embed_s"] = common.time_calls(
            lambda: predictor.set_image(image), warmup=args.warmup, iters=args.iters, cpu_seconds=record["embed_cpu_s"]
        )
        record["predict_s"] = common.time_calls(
            lambda: predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True),
            warmup=args.warmup,
            iters=args.iters,
        )


def track_once(
    predictor: object, video_dir: str, masks: np.ndarray
) -> tuple[list[tuple[float, float]], dict[int, np.ndarray]]:
    """One fresh session: init_state, add_new_mask per object, propagate_in_video.

    Returns the three phases' (wall, CPU) seconds and each frame's [objects, H, W] boolean masks.
    """
    session: dict = {}
    init_s = timed(lambda: session.update(state=predictor.init_state(video_path=video_dir)))
    state = session["state"]

    def add_masks() -> None:
        for obj_id, mask in enumerate(masks, start=1):
            predictor.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=mask)

    masks_by_frame: dict[int, np.ndarray] = {}

    def propagate() -> None:
        # Reading each frame's masks back to the host is part of using the predictor.
        for frame_idx, _, mask_logits in predictor.propagate_in_video(state):
            masks_by_frame[frame_idx] = (mask_logits[:, 0] > 0).cpu().numpy()

    add_s = timed(add_masks)
    prop_s = timed(propagate)
    return [init_s, add_s, prop_s], masks_by_frame


def bench_video(args: argparse.Namespace, record: dict, autocast: Callable) -> None:
    from sam2.build_sam import build_sam2_video_predictor

    predictor = build_sam2_video_predictor(
        args.config,
        args.weights,
        device=args.device,
        hydra_overrides_extra=size_overrides(args.image_size),
        apply_postprocessing=False,
    )
    masks = np.load(args.masks)  # [objects, H, W] bool
    record.update(init_state_s=[], add_mask_s=[], propagate_s=[], propagate_cpu_s=[], frames_out=[])
    with phase(record, "video", args.device), torch.inference_mode(), autocast():
        for repetition in range(args.warmup + args.iters):
            (init_s, add_s, prop_s), masks_by_frame = track_once(predictor, args.video_dir, masks)
            if repetition >= args.warmup:
                record["init_state_s"].append(init_s[0])
                record["add_mask_s"].append(add_s[0])
                record["propagate_s"].append(prop_s[0])
                record["propagate_cpu_s"].append(prop_s[1])
                record["frames_out"].append(len(masks_by_frame))
    record["num_frames"] = len(list(Path(args.video_dir).glob("*.jpg")))
    if args.masks_out:
        # [frames, objects, H, W] of the last propagation, for the ours-vs-reference agreement check.
        np.savez_compressed(args.masks_out, masks=np.stack([masks_by_frame[i] for i in sorted(masks_by_frame)]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--video-dir", required=True)
    parser.add_argument("--masks", required=True, help=".npy of [objects, H, W] masks for frame 0")
    parser.add_argument("--out", required=True)
    parser.add_argument("--masks-out", default=None, help=".npz for the last propagation's masks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=None, help="video predictor input size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--phases", nargs="+", default=["image", "video"])
    args = parser.parse_args()

    def image_autocast() -> contextlib.AbstractContextManager:
        # The official predictors are used under bf16 autocast on GPU; on CPU images run in fp32.
        return torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else contextlib.nullcontext()

    def video_autocast() -> contextlib.AbstractContextManager:
        # The official video predictor keeps its memory bank in bf16 and needs autocast on CPU too.
        return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)

    record: dict = {"device": args.device, "threads": torch.get_num_threads()}
    if "image" in args.phases:
        bench_image(args, record, image_autocast)
    if "video" in args.phases:
        bench_video(args, record, video_autocast)
    import sam2

    record["modules"] = {"sam2": sam2.__file__}
    Path(args.out).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
