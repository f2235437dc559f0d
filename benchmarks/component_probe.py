"""Child process for bench_components.py: times one model component of one side, forward and backward.

The same file runs for ours and for the reference: the component is built by Hydra from an
official model config (`model.image_encoder` or `model.memory_attention`), so its `_target_`
resolves to whichever `sam2` is first on `PYTHONPATH`. Weights come from `--weights` when that file
exists; otherwise this run saves its own there (the parent runs the reference first, so both sides
share the reference's initial weights). Inputs are drawn from a fixed seed.

    python benchmarks/component_probe.py --config sam2.1_hiera_b+.yaml --component image_encoder \
        --weights w.pt --out probe.json --device cuda --batch 8 --resolution 1024

Records per timed call: wall and CPU seconds of a forward under `torch.no_grad` and of a training
forward+backward (train mode, autocast as the trainer uses it), the peak memory of the
forward+backward calls, and evenly spaced samples of the forward outputs (to check both sides did the same
work). With `--profile`, a torch.profiler table of two forward+backward calls is written beside
the record.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

# Run as a script: its folder is sys.path[0]. Import the side's `sam2`, and only the side-neutral
# helpers from common.py (loaded by path, not as `benchmarks.common`).
sys.path.pop(0)
_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

COMPONENTS = ("image_encoder", "memory_attention")


def build(args: argparse.Namespace) -> torch.nn.Module:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(args.config).model
    node = cfg[args.component]
    if args.component == "memory_attention":
        feat = args.resolution // 16  # RoPE tables sized for the feature map, as the trainer sets them
        node.layer.self_attention.feat_sizes = [feat, feat]
        node.layer.cross_attention.feat_sizes = [feat, feat]
    torch.manual_seed(0)
    module = instantiate(node, _convert_="all")
    weights = Path(args.weights)
    if weights.is_file():
        module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        torch.save(module.state_dict(), weights)
    return module.to(args.device).train()


def make_call(module: torch.nn.Module, args: argparse.Namespace) -> Callable[[], list[Tensor]]:
    """A function running the component on fixed inputs and returning its output tensors."""
    gen = torch.Generator().manual_seed(1)
    if args.component == "image_encoder":
        images = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=gen).to(args.device)

        return lambda: module(images)["backbone_fpn"]
    # One frame's memory attention as a training clip's last frame sees it: `memory_frames`
    # spatial memories and the object pointers of every earlier frame, each pointer split into
    # d_model / kv_dim tokens of the memory width (4 of 64 in the official configs).
    hw = (args.resolution // 16) ** 2
    d_model, kv_dim = module.d_model, module.layers[0].cross_attn_image.kv_in_dim
    ptr_tokens = d_model // kv_dim * min(args.memory_frames, 16)
    curr = torch.randn(hw, args.batch, d_model, generator=gen).to(args.device)
    curr_pos = torch.randn(hw, args.batch, d_model, generator=gen).to(args.device)
    memory = torch.randn(args.memory_frames * hw + ptr_tokens, args.batch, kv_dim, generator=gen).to(args.device)
    memory_pos = torch.randn(memory.shape, generator=gen).to(args.device)

    return lambda: [
        module(curr=curr, curr_pos=curr_pos, memory=memory, memory_pos=memory_pos, num_obj_ptr_tokens=ptr_tokens)
    ]


def output_sample(outputs: list[Tensor], per_output: int = 4096) -> list[float]:
    """Evenly spaced elements of each output, for comparing the sides' outputs without storing them."""
    samples = []
    for out in outputs:
        flat = out.detach().float().flatten()
        samples.append(flat[:: max(1, flat.numel() // per_output)].cpu())
    return torch.cat(samples).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="an official model config file (yaml)")
    parser.add_argument("--component", required=True, choices=COMPONENTS)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("none", "bfloat16", "float16"), default="none")
    parser.add_argument("--batch", type=int, default=1, help="images (image encoder) or objects (memory attention)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--memory-frames", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    module = build(args)
    call = make_call(module, args)
    autocast = (
        torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.amp))
        if args.amp != "none"
        else contextlib.nullcontext()
    )

    def forward() -> None:
        with torch.no_grad(), autocast:
            call()

    def forward_backward() -> None:
        module.zero_grad(set_to_none=True)
        with autocast:
            loss = sum(out.float().mean() for out in call())
        loss.backward()

    record: dict = {"modules": {"sam2": getattr(sys.modules.get("sam2"), "__file__", "")}}
    module.eval()  # no dropout or drop-path: the checksum must not depend on random draws
    with torch.no_grad(), autocast:
        record["output_sample"] = output_sample(call())
    module.train()
    record["forward_cpu_s"], record["train_cpu_s"] = [], []
    record["forward_s"] = common.time_calls(
        forward, warmup=args.warmup, iters=args.iters, cpu_seconds=record["forward_cpu_s"]
    )
    common.reset_peak_memory(args.device)
    record["train_s"] = common.time_calls(
        forward_backward, warmup=args.warmup, iters=args.iters, cpu_seconds=record["train_cpu_s"]
    )
    common.sync_device()
    record["train_peak_bytes"] = common.peak_memory_bytes(args.device)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        on_gpu = torch.device(args.device).type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=activities) as prof:
            for _ in range(2):
                forward_backward()
            common.sync_device()
        sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        Path(args.out).with_name("profile.txt").write_text(table)
        record["ops_per_call"] = sum(e.count for e in prof.key_averages()) / 2
    Path(args.out).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
