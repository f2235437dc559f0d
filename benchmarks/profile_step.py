"""Profile one CPU training step of our SAM2Train + loss on a synthetic clip (no data loading).

    python benchmarks/profile_step.py --frames 4 --resolution 256 --steps 3 [--cprofile] [--torch-profiler]
    python benchmarks/profile_step.py --opt activation_checkpointing=true   # a fast path on
    python benchmarks/profile_step.py --opt compile_modules=sam_mask_decoder,memory_encoder

Builds the model and loss from the benchmark's training config (`train_config.py`: the official
MOSE fine-tune settings, tiny trunk), so it runs the same work as `bench_train_step.py` minus
the data pipeline and the trainer loop. Prints seconds per step (wall and CPU) and, on request,
the top of a cProfile or torch.profiler table.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import clip_batch, reference_root
from benchmarks.train_config import TrainCase, model_and_loss_configs
from training.loss_fns import CORE_LOSS_KEY


def build(args: argparse.Namespace):
    case = TrainCase("profile", "tiny", args.resolution, num_frames=args.frames, max_num_objects=args.objects)
    model_cfg, loss_cfg = model_and_loss_configs(reference_root(), case, device="cpu")
    torch.manual_seed(0)
    model = instantiate(model_cfg, _convert_="all")
    loss = instantiate(loss_cfg, _convert_="all")
    if args.opt:
        from training.engine.parallelize import apply_training_optimizations

        def value(text: str) -> bool | str | list[str]:
            if text.lower() in ("1", "0", "true", "false", "yes", "no"):
                return text.lower() in ("1", "true", "yes")
            return text.split(",") if "," in text else text

        options = {key: value(text) for key, text in (item.split("=", 1) for item in args.opt)}
        model = apply_training_optimizations(model, **options)
    model.train()
    return model, loss


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def step(model, loss, batch, optim) -> None:
    frames = model(batch)
    losses = loss(frames, batch.masks)
    optim.zero_grad(set_to_none=True)
    losses[CORE_LOSS_KEY].backward()
    optim.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--objects", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--unfused", action="store_true", help="single-tensor AdamW (the pre-fast-path optimizer)")
    parser.add_argument("--torch-profiler", action="store_true")
    parser.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--opt", nargs="*", default=[], help="apply_training_optimizations keywords, KEY=VALUE")
    args = parser.parse_args()
    model, loss = build(args)
    batch = clip_batch(args.frames, args.objects, args.resolution)
    # The trainer's choice (training.optimizer): fused AdamW wherever torch has it.
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=not args.unfused)
    step(model, loss, batch, optim)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    if args.cprofile:
        profiler = cProfile.Profile()
        profiler.enable()
    if args.torch_profiler:
        with torch.profiler.profile(record_shapes=False) as prof:
            for _ in range(args.steps):
                step(model, loss, batch, optim)
    else:
        for _ in range(args.steps):
            step(model, loss, batch, optim)
    wall, cpu = (time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps
    peak = _peak_rss_gib()
    print(f"{wall:.3f} s/step wall, {cpu:.3f} s/step CPU, peak RSS {peak:.2f} GiB ({args.frames} frames, {args.resolution} px)")
    if args.cprofile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)
    if args.torch_profiler:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


if __name__ == "__main__":
    main()
