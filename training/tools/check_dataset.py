"""Check a dataset before training on it.

    python -m training.tools.check_dataset --img-folder data/JPEGImages --gt-folder data/Annotations
    python -m training.tools.check_dataset --img-folder dataset/images --gt-folder dataset/masks
    python -m training.tools.check_dataset --config sam2.1_training/custom_finetune dataset.img_folder=/data/x

Prints counts (videos or images, frames, objects per mask, empty masks, frame sizes) and every
problem with its file. Exits 1 when the data cannot train, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from training.dataset.checks import DatasetReport, check_dataset, config_reports
from training.engine.config import ConfigError, compose_config, resolve_config


def _reports_from_config(config_name: str, overrides: list[str], fast: bool) -> list[DatasetReport]:
    # The same lookup and overrides as train.py's -c, so what is checked is what would train.
    cfg, path = compose_config(config_name, overrides)
    data = resolve_config(cfg, path).trainer.data
    return config_reports(OmegaConf.to_container(data, resolve=True), fast)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-folder", help="frames (<video>/<frame>.jpg) or images folder")
    parser.add_argument("--gt-folder", help="masks folder")
    parser.add_argument("--file-list-txt", default=None, help="optional list of videos/images to use")
    parser.add_argument("--layout", choices=["auto", "video", "images"], default="auto")
    parser.add_argument("--per-object", action="store_true", help="masks are <video>/<object>/<frame>.png")
    parser.add_argument("--config", help="check every dataset of this training config instead")
    parser.add_argument("--fast", action="store_true", help="structure and first frames only (what train.py runs)")
    parser.add_argument("--max-problems", type=int, default=200)
    parser.add_argument("overrides", nargs="*", help="with --config: Hydra overrides, as for train.py")
    args = parser.parse_args(argv)

    if args.config:
        try:
            reports = _reports_from_config(args.config, args.overrides, args.fast)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif args.overrides:
        parser.error("key=value overrides go with --config")
    elif args.img_folder and args.gt_folder:
        reports = [check_dataset(args.img_folder, args.gt_folder, layout=args.layout,
                                 file_list_txt=args.file_list_txt, is_palette=not args.per_object, fast=args.fast)]
    else:
        parser.error("give --img-folder and --gt-folder, or --config")
    for report in reports:
        print(report.summary(max_problems=args.max_problems))
    ok = all(r.ok for r in reports)
    print("OK: the data can train" if ok else "FAILED: fix the errors above before training")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
