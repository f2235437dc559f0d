"""Data-loading throughput: our pipeline against the official one, same data, same machine, same run.

Clips of 8 frames at 1024x1024 with the MOSE fine-tune transforms (flip, affine, square resize,
colour jitter, grayscale, normalise), drawn by VOSDataset + PNGRawDataset + RandomUniformSampler
and batched by collate_fn through a DataLoader with 0 and 2 workers. Each measurement runs in
its own process; the reference one imports the official sources (.cache/sam2-reference) first.

    python benchmarks/bench_data.py                       # writes benchmarks/results/bench_data.{md,json}
    python benchmarks/bench_data.py --clips 24 --frame-size 720 1280 --workers 0 2
    python benchmarks/bench_data.py --epoch-start --workers 2 8   # what persistent workers would save

`--epoch-start` measures, in one process of ours, what a new epoch costs before its first batch:
the trainer builds each epoch's DataLoader afresh, so its workers start again, against a
`persistent_workers` DataLoader iterated again. The process holds `--parent-gib` of tensors, as a
trainer holds its model and optimizer state (forking copies its page tables).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def mose_transforms(T, resolution: int) -> list:
    """The MOSE fine-tune config's train transforms, built from module `T` (ours or the reference's)."""
    return [
        T.ComposeAPI(
            [
                T.RandomHorizontalFlip(consistent_transform=True),
                T.RandomAffine(degrees=25, shear=20, image_interpolation="bilinear", consistent_transform=True),
                T.RandomResizeAPI(sizes=resolution, square=True, consistent_transform=True),
                T.ColorJitter(consistent_transform=True, brightness=0.1, contrast=0.03, saturation=0.03, hue=None),
                T.RandomGrayscale(p=0.05, consistent_transform=True),
                T.ColorJitter(consistent_transform=False, brightness=0.1, contrast=0.05, saturation=0.05, hue=None),
                T.ToTensorAPI(),
                T.NormalizeAPI(mean=MEAN, std=STD),
            ]
        )
    ]


def mose_loader(args: argparse.Namespace, img_folder: str, gt_folder: str, workers: int, persistent: bool = False):
    """A DataLoader of `args.clips` random clips through VOSDataset with the MOSE transforms, built
    by whichever `training` package is importable."""
    from functools import partial

    from torch.utils.data import DataLoader, RandomSampler

    from training.dataset import transforms as T
    from training.dataset.vos_dataset import VOSDataset
    from training.dataset.vos_raw_dataset import PNGRawDataset
    from training.dataset.vos_sampler import RandomUniformSampler
    from training.utils.data_utils import collate_fn

    dataset = VOSDataset(
        mose_transforms(T, args.resolution),
        True,
        PNGRawDataset(img_folder, gt_folder),
        RandomUniformSampler(num_frames=args.num_frames, max_num_objects=3),
        multiplier=1,
    )
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=RandomSampler(dataset, replacement=True, num_samples=args.clips),
        num_workers=workers,
        collate_fn=partial(collate_fn, dict_key="all"),
        persistent_workers=persistent,
    )


def run_worker(args: argparse.Namespace) -> dict:
    """Time one pipeline (whichever `training` package is importable) and return its numbers."""
    import random

    import torch

    import training

    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    loader = mose_loader(args, args.img_folder, args.gt_folder, args.num_workers)
    # Everything from the first request on is timed: with workers, clips prefetched during a
    # warm-up would otherwise be counted as free.
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    shape = None
    for batch in loader:
        shape = list(batch.img_batch.shape)
    elapsed = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start  # the loop's end joined the workers, so their time is in
    return {
        "package": os.path.dirname(training.__file__),
        "clips": args.clips,
        "seconds": elapsed,
        "clips_per_s": args.clips / elapsed,
        "cpu_s_per_clip": cpu / args.clips,
        "img_batch_shape": shape,
    }


def run_epoch_start(args: argparse.Namespace, img_folder: str, gt_folder: str) -> list[dict]:
    """Seconds from iter() to the first batch: a fresh DataLoader (workers start) against a
    persistent one iterated again (workers kept), medians of `--rounds`, per worker count."""
    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(args.threads)
    ballast = torch.ones(int(args.parent_gib * 2**30) // 4)  # noqa: F841 - resident, like a trainer's state

    def loader(workers: int, persistent: bool) -> DataLoader:
        return mose_loader(args, img_folder, gt_folder, workers, persistent)

    def first_batch_seconds(data: DataLoader) -> float:
        start = time.perf_counter()
        batches = iter(data)
        next(batches)
        seconds = time.perf_counter() - start
        for _ in batches:  # finish the epoch, as the trainer does
            pass
        return seconds

    rows = []
    for workers in [w for w in args.workers if w > 0]:
        fresh = [first_batch_seconds(loader(workers, persistent=False)) for _ in range(args.rounds)]
        kept = loader(workers, persistent=True)
        first_batch_seconds(kept)  # its workers start here, once
        again = [first_batch_seconds(kept) for _ in range(args.rounds)]
        rows.append({"workers": workers, "fresh_s": statistics.median(fresh), "persistent_s": statistics.median(again)})
        print(f"workers={workers}: first batch of an epoch {rows[-1]['fresh_s']:.3f} s with a fresh DataLoader, "
              f"{rows[-1]['persistent_s']:.3f} s with persistent workers", flush=True)  # fmt: skip
    return rows


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers), all threads."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_dataset(root: Path, num_videos: int, num_frames: int, size: tuple[int, int]) -> tuple[str, str]:
    sys.path.insert(0, str(REPO))
    from tests.data_factory import make_video_dataset

    paths = make_video_dataset(root, num_videos=num_videos, num_frames=num_frames, size=size, num_objects=3)
    return paths.img_folder, paths.gt_folder


def measure(impl: str, workers: int, args: argparse.Namespace, img_folder: str, gt_folder: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--img-folder",
        img_folder,
        "--gt-folder",
        gt_folder,
        "--num-workers",
        str(workers),
        "--clips",
        str(args.clips),
        "--resolution",
        str(args.resolution),
        "--num-frames",
        str(args.num_frames),
        "--threads",
        str(args.threads),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    cwd = None
    if impl == "reference":
        sys.path.insert(0, str(REPO))
        from tests.reference import ensure_reference

        env["PYTHONPATH"] = str(ensure_reference())
        env["PYTHONNOUSERSITE"] = "1"
        cwd = tempfile.mkdtemp(prefix="bench-ref-")
    else:
        env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = "sam2-reference" if impl == "reference" else str(REPO)
    if expected not in result["package"]:
        raise RuntimeError(f"{impl} run imported training from {result['package']}")
    return result


def write_report(rows: list[dict], args: argparse.Namespace) -> None:
    """Markdown table and JSON under args.out, and the table on stdout."""
    setup = (
        f"{args.num_frames}-frame clips at {args.resolution}x{args.resolution} from {args.frame_size[0]}x"
        f"{args.frame_size[1]} JPEG frames, MOSE fine-tune transforms, batch size 1, {args.clips} timed clips, "
        f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs"
    )
    lines = [
        f"# Data loading ({setup})",
        "",
        (
            f"Medians of {args.rounds} alternating rounds. CPU seconds per clip (all processes and threads) "
            "are the robust figure on a shared machine; clips/s is wall-clock throughput."
        ),
        "",
        (
            "| DataLoader workers | reference clips/s | ours clips/s | speed-up | reference CPU s/clip | "
            "ours CPU s/clip | CPU speed-up |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['workers']} | {r['reference_clips_per_s']:.2f} | {r['ours_clips_per_s']:.2f} | "
        f"x{r['speedup']:.2f} | {r['reference_cpu_s_per_clip']:.2f} | {r['ours_cpu_s_per_clip']:.2f} | "
        f"x{r['cpu_speedup']:.2f} |"
        for r in rows
    ]
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "bench_data.md").write_text("\n".join(lines) + "\n")
    Path(args.out, "bench_data.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--img-folder")
    parser.add_argument("--gt-folder")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to compare")
    parser.add_argument("--clips", type=int, default=12, help="clips per measurement, all timed")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--frame-size", type=int, nargs=2, default=[720, 1280], metavar=("H", "W"))
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames-per-video", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3, help="alternating reference/ours runs per setting")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument(
        "--epoch-start", action="store_true", help="time an epoch's first batch, workers started or kept"
    )
    parser.add_argument("--parent-gib", type=float, default=3.0, help="with --epoch-start: tensors the process holds")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    if args.epoch_start:
        with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
            folders = make_dataset(Path(tmp), args.videos, args.frames_per_video, tuple(args.frame_size))
            rows = run_epoch_start(args, *folders)
        os.makedirs(args.out, exist_ok=True)
        Path(args.out, "bench_data_epoch_start.json").write_text(json.dumps(rows, indent=2))
        return

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        img_folder, gt_folder = make_dataset(Path(tmp), args.videos, args.frames_per_video, tuple(args.frame_size))
        rows = []
        for workers in args.workers:
            runs = {"reference": [], "ours": []}
            for _ in range(args.rounds):  # alternate, so load changes on a shared machine hit both alike
                for impl, results in runs.items():
                    results.append(measure(impl, workers, args, img_folder, gt_folder))
            row = {"workers": workers, "img_batch_shape": runs["ours"][0]["img_batch_shape"]}
            for impl, results in runs.items():
                row[f"{impl}_clips_per_s"] = statistics.median(r["clips_per_s"] for r in results)
                row[f"{impl}_cpu_s_per_clip"] = statistics.median(r["cpu_s_per_clip"] for r in results)
            row["speedup"] = row["ours_clips_per_s"] / row["reference_clips_per_s"]
            row["cpu_speedup"] = row["reference_cpu_s_per_clip"] / row["ours_cpu_s_per_clip"]
            rows.append(row)
            print(
                f"workers={workers}: clips/s reference {row['reference_clips_per_s']:.2f} ours "
                f"{row['ours_clips_per_s']:.2f} (x{row['speedup']:.2f}); CPU s/clip reference "
                f"{row['reference_cpu_s_per_clip']:.2f} ours {row['ours_cpu_s_per_clip']:.2f} "
                f"(x{row['cpu_speedup']:.2f})",
                flush=True,
            )

    write_report(rows, args)


if __name__ == "__main__":
    main()
