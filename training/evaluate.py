"""Evaluate SAM 2 checkpoints on a dataset folder: metrics table, CSV, overlay PNGs.

    python training/evaluate.py --model-config sam2.1_hiera_b+ \\
        --checkpoint checkpoints/sam2.1_hiera_base_plus.pt \\
        --checkpoint sam2_logs/custom_finetune/checkpoints/checkpoint.pt \\
        --img-folder data/JPEGImages --gt-folder data/Annotations
    python -m training.evaluate -c sam2.1_training/custom_finetune     # the run's best checkpoint

Videos (a folder per video) are scored as semi-supervised VOS: the first frame's ground-truth
mask (or `--prompt box` / `click`) is given and J, F and J&F are reported per object, per video
and overall (DAVIS). Images are scored interactively: box and 1-click mIoU, mIoU after
`--correction-clicks` simulated corrections, NoC@85 / NoC@90. With two checkpoints the two runs
are printed side by side with their difference.
"""

from __future__ import annotations

import os
import sys

# `python training/evaluate.py` puts training/ first on sys.path, where its sub-packages would
# shadow same-named top-level modules; the repository root belongs there.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from training.evaluation.image_eval import evaluate_image_dataset  # noqa: E402
from training.evaluation.loading import build_eval_model, default_checkpoint, open_dataset, pick_device  # noqa: E402
from training.evaluation.overlays import save_overlays  # noqa: E402
from training.evaluation.report import compare_results, format_comparison, format_result, write_csv  # noqa: E402
from training.evaluation.results import EvalResult  # noqa: E402
from training.evaluation.video_eval import VIDEO_PROMPTS, evaluate_video_dataset  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="training/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument("-c", "--config", help="training config (its trainer.model, dataset.* and run folder)")
    model.add_argument("--model-config", help="model config name (sam2.1_hiera_b+) or a YAML file with a model: node")
    model.add_argument(
        "--checkpoint", action="append", default=[],
        help="weights file ('none': random init); give twice to compare two",
    )
    model.add_argument("--name", action="append", default=[], help="a name per checkpoint (default: file stem)")
    model.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    data = parser.add_argument_group("data")
    data.add_argument("--img-folder", help="frames (<video>/<frame>.jpg) or images (<name>.jpg); default with -c: "
                      "dataset.val_img_folder, else dataset.img_folder")
    data.add_argument("--gt-folder", help="masks (<video>/<frame>.png) or (<name>.png)")
    data.add_argument("--file-list-txt", default=None, help="names of the videos / images to use")
    data.add_argument("--dataset-kind", choices=("auto", "video", "image"), default="auto")
    data.add_argument("--task", choices=("video", "image"), default=None, help="default: the dataset's kind")
    data.add_argument("--max-items", type=int, default=None, help="evaluate only the first N videos / images")
    data.add_argument("--max-frames", type=int, default=None, help="track at most N frames per video")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--prompt", choices=VIDEO_PROMPTS, default="mask", help="first-frame prompt for videos")
    metrics.add_argument("--correction-clicks", type=int, default=4, help="images: report mIoU after 1 + K clicks")
    metrics.add_argument("--no-skip-first-last", action="store_true", help="videos: also score first and last frame")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="sam2_eval", help="CSV, summary JSON and overlays go here")
    out.add_argument("--num-overlays", type=int, default=4, help="overlay PNGs for the first N samples")
    return parser


def _training_setup(args: argparse.Namespace):
    """(training config, its run folder) for -c, or (None, None)."""
    if not args.config:
        return None, None
    from training.engine.config import compose_config, default_run_dir, resolve_config

    cfg, path = compose_config(args.config)
    cfg = resolve_config(cfg, path)
    run_dir = cfg.get("launcher", {}).get("experiment_log_dir") or default_run_dir(path)
    return cfg, run_dir


def _runs(args: argparse.Namespace, run_dir: str | None) -> list[tuple[str, str | None]]:
    """(name, checkpoint) of each run to evaluate."""
    checkpoints = list(args.checkpoint)
    if not checkpoints and run_dir is not None:
        found = default_checkpoint(run_dir)
        if found is None:
            raise SystemExit(
                f"no --checkpoint given and no checkpoint in {run_dir}/checkpoints; train first or pass one"
            )
        checkpoints = [found]
    if not checkpoints:
        raise SystemExit("give --checkpoint (twice to compare two), or -c with a trained run")
    if len(checkpoints) > 2:
        raise SystemExit(f"at most two checkpoints can be compared, got {len(checkpoints)}")
    names = list(args.name) or [Path(c).stem for c in checkpoints]
    if len(names) != len(checkpoints) or len(set(names)) != len(names):
        names = [f"{i}_{Path(c).stem}" for i, c in enumerate(checkpoints)]
    return [(name, None if c.lower() == "none" else c) for name, c in zip(names, checkpoints)]


def evaluate_checkpoint(args: argparse.Namespace, cfg, checkpoint: str | None, dataset, task: str) -> EvalResult:
    device = pick_device(args.device)
    model = build_eval_model(checkpoint, model_config=args.model_config, training_config=cfg, device=device)
    common = dict(keep_predictions=args.num_overlays)
    if task == "video":
        return evaluate_video_dataset(
            model, dataset, prompt=args.prompt, max_videos=args.max_items, max_frames=args.max_frames,
            skip_first_and_last=not args.no_skip_first_last, **common,
        )
    return evaluate_image_dataset(
        model, dataset, max_images=args.max_items, correction_clicks=args.correction_clicks, **common
    )


def main(argv: list[str] | None = None) -> dict[str, EvalResult]:
    args = build_parser().parse_args(argv)
    cfg, run_dir = _training_setup(args)
    dataset_cfg = cfg.get("dataset", {}) if cfg is not None else {}
    # A config's held-out data when it names one: scoring the training images says little.
    use_val = bool(dataset_cfg.get("val_img_folder")) and bool(dataset_cfg.get("val_gt_folder"))
    img_folder = args.img_folder or dataset_cfg.get("val_img_folder" if use_val else "img_folder")
    gt_folder = args.gt_folder or dataset_cfg.get("val_gt_folder" if use_val else "gt_folder")
    if cfg is not None and not args.img_folder and not use_val:
        print("note: the config has no dataset.val_img_folder; scoring its training data", file=sys.stderr)
    file_list = args.file_list_txt or (None if use_val else dataset_cfg.get("file_list_txt"))
    dataset, kind = open_dataset(img_folder, gt_folder, kind=args.dataset_kind, file_list_txt=file_list)
    task = args.task or kind
    results: dict[str, EvalResult] = {}
    for name, checkpoint in _runs(args, run_dir):
        result = evaluate_checkpoint(args, cfg, checkpoint, dataset, task)
        results[name] = result
        write_csv(result, os.path.join(args.output_dir, f"{name}.csv"))
        with open(os.path.join(args.output_dir, f"{name}_summary.json"), "w") as f:
            json.dump({"checkpoint": checkpoint, **result.summary}, f, indent=2, default=str)
        save_overlays(result.samples, os.path.join(args.output_dir, "overlays", name))
        print(format_result(result, title=f"{name} ({checkpoint or 'random init'})"), end="\n\n")
    if len(results) == 2:
        compare_results(results).to_csv(os.path.join(args.output_dir, "comparison.csv"))
        print(format_comparison(results))
    print(f"\nwrote {args.output_dir}/")
    return results


if __name__ == "__main__":
    from sam2.model_weights import CheckpointError

    try:
        main()
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        # User errors (paths, names, mismatched weights) read better without a traceback.
        raise SystemExit(f"error: {exc}") from None
