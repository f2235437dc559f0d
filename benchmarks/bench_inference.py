"""Inference, ours vs the official predictors: same random weights, same frames, same machine.

    python benchmarks/bench_inference.py                   # tiny on CPU (video at 512 px), all sizes on GPU
    python benchmarks/bench_inference.py --quick           # CI mode
    python benchmarks/bench_inference.py --models tiny base_plus --image-size 1024 --frames 16

Both sides run `inference_probe.py` in their own child processes, alternating
(reference, ours, ours, reference, ...). Reported per model: image embedding time
(`SAM2ImagePredictor.set_image`), a point `predict`, video propagation frames/s
(`propagate_in_video` over all frames after `add_new_mask` on frame 0 for each object), the time
of `init_state` (frame loading), and each phase's peak memory. Results go to
benchmarks/results/inference.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    BENCH_DIR,
    REPO_ROOT,
    alternating_runs,
    default_device,
    gib,
    machine_info,
    median,
    ratio,
    reference_root,
    run_probe,
    write_report,
)
from benchmarks.synthetic_data import make_video_dataset
from benchmarks.train_config import MODEL_CONFIGS

PROBE = BENCH_DIR / "inference_probe.py"


def make_weights(model_size: str, path: Path, seed: int = 0) -> Path:
    """Random weights built by the official code from a seed, with the object-score head biased
    towards "object present" so tracked frames carry real masks (random heads predict none)."""
    from tests.reference import Reference

    Reference(reference_root()).run(
        """
        from sam2.build_sam import build_sam2
        torch.manual_seed(inputs["seed"])
        model = build_sam2(inputs["config"], None, device="cpu", apply_postprocessing=False)
        state = model.state_dict()
        head_biases = [k for k in state if k.startswith("sam_mask_decoder.pred_obj_score_head") and k.endswith("bias")]
        state[head_biases[-1]] += 10.0
        torch.save({"model": state}, inputs["path"])
        """,
        config=model_config(model_size),
        seed=seed,
        path=str(path),
    )
    return path


def model_config(model_size: str) -> str:
    # The official config form; ours accepts it too (same Hydra config module layout).
    return f"configs/sam2.1/{MODEL_CONFIGS[model_size]}"


def make_frames(folder: Path, *, num_frames: int, num_objects: int, size: tuple[int, int]) -> tuple[Path, Path]:
    """One synthetic video as `<folder>/frames/*.jpg` plus `masks.npy`, frame 0's [objects, H, W]."""
    data = make_video_dataset(folder / "data", num_videos=1, num_frames=num_frames, num_objects=num_objects, size=size)
    video = data.video_names[0]
    ids = np.asarray(Image.open(data.gt_folder / video / "00000.png"))
    masks = np.stack([ids == obj_id for obj_id in range(1, num_objects + 1)])
    masks_path = folder / "masks.npy"
    np.save(masks_path, masks)
    return data.img_folder / video, masks_path


def run_side(
    side: str,
    model_size: str,
    run_index: int,
    *,
    workdir: Path,
    weights: Path,
    frames: Path,
    masks: Path,
    args: argparse.Namespace,
    device: str,
) -> dict[str, Any]:
    run_dir = workdir / "runs" / f"{model_size}-{side}-{run_index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "probe.json"
    probe_args = [
        str(PROBE),
        "--config",
        model_config(model_size),
        "--weights",
        str(weights),
        "--video-dir",
        str(frames),
        "--masks",
        str(masks),
        "--out",
        str(out),
        "--device",
        device,
        "--warmup",
        str(args.warmup),
        "--iters",
        str(args.iters),
        "--masks-out",
        str(run_dir / "masks.npz"),
    ]
    if args.image_size:
        probe_args += ["--image-size", str(args.image_size)]
    root = REPO_ROOT if side == "ours" else reference_root()
    record = run_probe(
        probe_args, side=side, root=root, run_dir=run_dir, out=out, threads=args.threads, timeout=args.timeout
    )
    record["masks_file"] = str(run_dir / "masks.npz")
    return record


def mask_iou(ours_file: str, reference_file: str) -> float:
    """Mean IoU over frames and objects of two sides' propagated masks (1.0 where both are empty)."""
    ours, ref = np.load(ours_file)["masks"], np.load(reference_file)["masks"]
    if ours.shape != ref.shape:
        raise ValueError(f"mask shapes differ: ours {ours.shape}, reference {ref.shape}")
    axes = (-2, -1)
    inter, union = (ours & ref).sum(axes), (ours | ref).sum(axes)
    return float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())


def summarize(
    model_size: str, records: dict[str, list[dict[str, Any]]], errors: dict[str, list[str]]
) -> dict[str, Any]:
    """One report row: per-side medians pooled over runs, ratios ours/reference."""
    row: dict[str, Any] = {"model": model_size}
    for side, runs in records.items():
        if not runs:
            row[f"{side}_errors"] = "; ".join(e.splitlines()[0] for e in errors[side]) or "no runs"
            continue
        keys = ("embed_s", "embed_cpu_s", "predict_s", "propagate_s", "propagate_cpu_s", "init_state_s")
        pooled = {key: [v for run in runs for v in run[key]] for key in keys}
        frames = runs[0]["num_frames"]
        row[f"{side}_embed_s"] = median(pooled["embed_s"])
        row[f"{side}_embed_cpu_s"] = median(pooled["embed_cpu_s"])
        row[f"{side}_video_cpu_s_per_frame"] = median(pooled["propagate_cpu_s"]) / frames
        row[f"{side}_predict_ms"] = 1000 * median(pooled["predict_s"])
        row[f"{side}_video_fps"] = frames / median(pooled["propagate_s"])
        row[f"{side}_init_state_s"] = median(pooled["init_state_s"])
        row[f"{side}_image_peak_gib"] = gib(median([run["peak_image"] for run in runs]))
        row[f"{side}_video_peak_gib"] = gib(median([run["peak_video"] for run in runs]))
        row["frames"] = frames
        if any(n != frames for run in runs for n in run["frames_out"]):
            row[f"{side}_errors"] = f"propagation yielded {runs[0]['frames_out']} frames, expected {frames}"
    row["errors"] = (
        "; ".join(f"{side}: {row[f'{side}_errors']}" for side in records if row.get(f"{side}_errors")) or None
    )
    if records.get("ours") and records.get("reference"):
        row["mask_iou"] = mask_iou(records["ours"][0]["masks_file"], records["reference"][0]["masks_file"])
    row["embed_time_ratio"] = ratio(row.get("ours_embed_s"), row.get("reference_embed_s"))
    row["embed_cpu_ratio"] = ratio(row.get("ours_embed_cpu_s"), row.get("reference_embed_cpu_s"))
    row["video_cpu_ratio"] = ratio(row.get("ours_video_cpu_s_per_frame"), row.get("reference_video_cpu_s_per_frame"))
    row["fps_ratio"] = ratio(row.get("ours_video_fps"), row.get("reference_video_fps"))
    row["video_memory_ratio"] = ratio(row.get("ours_video_peak_gib"), row.get("reference_video_peak_gib"))
    return row


COLUMNS = [
    ("model", "model"),
    ("reference_embed_s", "ref embed s"),
    ("ours_embed_s", "ours embed s"),
    ("embed_time_ratio", "embed time ours/ref"),
    ("embed_cpu_ratio", "embed CPU ours/ref"),
    ("reference_predict_ms", "ref predict ms"),
    ("ours_predict_ms", "ours predict ms"),
    ("reference_video_fps", "ref video fps"),
    ("ours_video_fps", "ours video fps"),
    ("fps_ratio", "fps ours/ref"),
    ("video_cpu_ratio", "video CPU/frame ours/ref"),
    ("reference_video_peak_gib", "ref video peak GiB"),
    ("ours_video_peak_gib", "ours video peak GiB"),
    ("video_memory_ratio", "video mem ours/ref"),
    ("mask_iou", "mask IoU ours vs ref"),
    ("reference_init_state_s", "ref init_state s"),
    ("ours_init_state_s", "ours init_state s"),
    ("errors", "errors"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--models", nargs="+", default=None, choices=sorted(MODEL_CONFIGS), help="default: tiny on CPU, all four on GPU"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="video predictor input size (default: 512 on CPU, the config's 1024 on GPU); "
        "the official image predictor only runs at 1024",
    )
    parser.add_argument("--frames", type=int, default=8, help="video length")
    parser.add_argument("--objects", type=int, default=2, help="objects tracked")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides")
    parser.add_argument("--sides", nargs="+", default=["reference", "ours"], choices=["reference", "ours"])
    parser.add_argument("--quick", action="store_true", help="CI mode: 1 run per side, 1 timed repetition, 3 frames")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--workdir", type=Path, default=None, help="keep weights, frames and logs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.iters, args.repeats, args.frames = 1, 1, 1, 3
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = args.device or default_device()
    models = args.models or (["tiny"] if device == "cpu" else ["base_plus", "tiny", "small", "large"])
    if args.image_size is None and device == "cpu":
        # bf16 autocast (which the official video predictor needs) is slow on most CPUs.
        args.image_size = 512
    rows = []
    with tempfile.TemporaryDirectory(prefix="sam2-bench-inference-") as tmp:
        workdir = args.workdir or Path(tmp)
        # 16:9 frames of the width the model works at, like a 720p video scaled down.
        side_px = args.image_size or 1024
        frames, masks = make_frames(
            workdir, num_frames=args.frames, num_objects=args.objects, size=(side_px * 9 // 16, side_px)
        )
        for model_size in models:
            weights = make_weights(model_size, workdir / f"weights_{model_size}.pt")
            records, errors = alternating_runs(
                model_size,
                args.sides,
                args.repeats,
                partial(
                    run_side,
                    model_size=model_size,
                    workdir=workdir,
                    weights=weights,
                    frames=frames,
                    masks=masks,
                    args=args,
                    device=device,
                ),
            )
            rows.append(summarize(model_size, records, errors))
    meta = machine_info(device) | {
        "command": "python benchmarks/bench_inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "image_size": 1024,
        "video_image_size": args.image_size or 1024,
        "frames": args.frames,
        "objects": args.objects,
        "timed_repetitions_per_run": args.iters,
        "runs_per_side": args.repeats,
        "threads_per_side": args.threads or "torch default",
    }
    notes = (
        "embed: SAM2ImagePredictor.set_image (fp32 on CPU, bf16 autocast on GPU). video fps: frames / "
        "propagate_in_video seconds (bf16 autocast, as the official predictor needs), after add_new_mask "
        "on frame 0; apply_postprocessing=False on both sides. Peaks: CPU = peak RSS during the phase, "
        "GPU = torch.cuda.max_memory_allocated. Time and memory ratios below 1 and fps ratios above 1 favour ours. "
        "mask IoU: agreement of the two sides' propagated masks (bf16), a check that both did the same work."
    )
    md, _ = write_report(
        "inference",
        title="Inference: ours vs reference",
        columns=COLUMNS,
        rows=rows,
        meta=meta,
        notes=notes,
        results_dir=args.results_dir,
    )
    print(md.read_text())
    return rows


if __name__ == "__main__":
    main()
