"""The benchmark harness: timing, memory, reports, data, configs, the step probe, and smoke runs.

Timings are never asserted; what is checked is that each piece measures what it says and that
both benchmark scripts run end to end (marked `slow`: they start the official code and ours).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from benchmarks import common
from benchmarks.bench_train_step import SideResult, collect, summarize
from benchmarks.synthetic_data import make_video_dataset
from benchmarks.train_config import TrainCase, build_train_config, write_config


def test_time_calls_runs_warmup_untimed_then_times_each_call() -> None:
    calls = []

    def work() -> None:
        calls.append(1)
        time.sleep(0.01)

    cpu: list[float] = []
    times = common.time_calls(work, warmup=2, iters=3, cpu_seconds=cpu)
    assert len(calls) == 5
    assert len(times) == 3
    assert all(0.009 <= t < 1.0 for t in times)
    # Sleeping takes wall time but (almost) no CPU time.
    assert len(cpu) == 3 and all(0 <= c < 0.009 for c in cpu)
    with pytest.raises(ValueError, match="iters"):
        common.time_calls(work, warmup=0, iters=0)


def test_median_ratio_and_formatting() -> None:
    assert common.median([3.0, 1.0, 2.0, 10.0]) == 2.5
    with pytest.raises(ValueError):
        common.median([])
    assert common.ratio(1.5, 3.0) == 0.5
    assert common.ratio(None, 3.0) is None and common.ratio(1.0, 0.0) is None
    assert [common.format_cell(v) for v in (None, 1234.5, 2.345, 0.01234, "x")] == ["—", "1234", "2.35", "0.0123", "x"]


def test_peak_rss_sees_an_allocation_and_can_be_reset() -> None:
    if not common.reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    before = common.peak_rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, written, so its pages are resident
    during = common.peak_rss_bytes()
    assert during - before >= 60 * 2**20
    del block
    common.reset_peak_rss()
    assert common.peak_rss_bytes() < during


def test_gpu_peak_table_matches_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_PEAK_FLOPS", raising=False)
    assert common.gpu_bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.gpu_bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert common.gpu_bf16_peak_flops("Some Future GPU") is None
    monkeypatch.setenv("BENCH_PEAK_FLOPS", "1e12")
    assert common.gpu_bf16_peak_flops("Some Future GPU") == 1e12


def test_write_report_writes_table_and_json(tmp_path: Path) -> None:
    rows = [{"case": "a", "t": 0.5}, {"case": "b", "t": None}]
    md, js = common.write_report(
        "demo",
        title="Demo",
        columns=[("case", "case"), ("t", "seconds")],
        rows=rows,
        meta={"device": "cpu"},
        notes="read me",
        results_dir=tmp_path,
    )
    text = md.read_text()
    assert "| case | seconds |" in text and "| a | 0.5 |" in text and "| b | — |" in text
    assert "- device: cpu" in text and "read me" in text
    assert json.loads(js.read_text()) == {"title": "Demo", "meta": {"device": "cpu"}, "rows": rows}


def test_synthetic_videos_have_every_object_on_every_frame(tmp_path: Path) -> None:
    data = make_video_dataset(tmp_path, num_videos=2, num_frames=3, num_objects=2, size=(32, 48))
    assert data.video_names == ["video0000", "video0001"]
    for video in data.video_names:
        for frame in range(3):
            image = Image.open(data.img_folder / video / f"{frame:05d}.jpg")
            mask = Image.open(data.gt_folder / video / f"{frame:05d}.png")
            assert image.size == (48, 32) and image.mode == "RGB"
            assert mask.mode == "P"
            assert set(np.unique(np.asarray(mask)).tolist()) == {0, 1, 2}


def test_collect_and_summarize_use_only_timed_steps() -> None:
    record = {
        "step_times": [0.0, 1.0, 3.0, 6.0, 10.0, 100.0],
        "cpu_times": [0.0, 2.0, 4.0, 8.0, 16.0, 200.0],
        "peak_memory": [1, 5, 2, 3, 4, 99],
        "flops_per_step": 8e9,
    }
    result = SideResult()
    collect(record, result, warmup=2, iters=3)
    # Steps 2, 3, 4 last 2, 3 and 4 s; step 5 (the FLOP-counted one) and its memory are left out.
    assert result.step_seconds == [2.0, 3.0, 4.0]
    assert result.step_cpu_seconds == [2.0, 4.0, 8.0]
    assert result.peak_memory == [5]
    reference = SideResult(step_seconds=[6.0], peak_memory=[10 * 2**30], flops_per_step=[8e9])
    case = TrainCase("c", "tiny", 256, num_frames=1, max_num_objects=2)
    row = summarize(case, {"reference": reference, "ours": result}, peak_flops=1e9)
    assert row["ours_s_per_iter"] == 3.0 and row["reference_s_per_iter"] == 6.0
    assert row["time_ratio"] == 0.5
    assert row["ours_cpu_s_per_iter"] == 4.0 and row["reference_cpu_s_per_iter"] is None
    assert row["ours_mfu"] == pytest.approx(8e9 / 3.0 / 1e9)
    assert row["ours_gflop_per_step"] == 8.0
    assert row["ours_step_seconds"] == [2.0, 3.0, 4.0] and row["reference_step_seconds"] == [6.0]


def test_gpu_runs_are_timed_over_the_window_between_synced_steps() -> None:
    """On a GPU the probe waits for the device only after the last warm-up step and the last timed
    one; between them, step stamps mark when the host queued the step, so the window is timed."""
    record = {
        "step_times": [0.0, 1.0, 1.1, 1.2, 7.0, 100.0],
        "cpu_times": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        "peak_memory": [1, 1, 1, 1, 1, 1],
        "synced_steps": [1, 4],
    }
    result = SideResult()
    collect(record, result, warmup=2, iters=3)
    assert result.window_seconds == [2.0] and result.step_seconds == pytest.approx([0.1, 0.1, 5.8])
    case = TrainCase("c", "tiny", 256, num_frames=1, max_num_objects=2)
    row = summarize(case, {"ours": result}, peak_flops=None)
    assert row["ours_s_per_iter"] == 2.0
    unsynced = SideResult()
    collect({**record, "synced_steps": [4]}, unsynced, warmup=2, iters=3)  # the window's start not synced
    assert unsynced.window_seconds == []


def test_mask_iou_averages_frames_and_objects(tmp_path: Path) -> None:
    from benchmarks.bench_inference import mask_iou

    ours = np.zeros((2, 1, 4, 4), dtype=bool)
    ours[0, 0, :2] = True  # 8 pixels on frame 0; frame 1 empty on both sides counts as agreement
    ref = ours.copy()
    ref[0, 0, 0] = False  # 4 of them
    np.savez_compressed(tmp_path / "ours.npz", masks=ours)
    np.savez_compressed(tmp_path / "ref.npz", masks=ref)
    assert mask_iou(str(tmp_path / "ours.npz"), str(tmp_path / "ref.npz")) == pytest.approx((0.5 + 1.0) / 2)
    np.savez_compressed(tmp_path / "short.npz", masks=ours[:1])
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(str(tmp_path / "short.npz"), str(tmp_path / "ref.npz"))


STEPS_SCRIPT = """
import sys, torch
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.AdamW(model.parameters())
for _ in range(int(sys.argv[1])):
    optimizer.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
# The official trainer's one CUDA-only call; the probe's --cpu-peak-reset-noop must absorb it.
torch.cuda.reset_peak_memory_stats()
"""


def test_train_probe_records_steps_flops_and_neutralises_peak_reset(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(STEPS_SCRIPT))
    out = tmp_path / "probe.json"
    probe = [sys.executable, str(common.BENCH_DIR / "train_probe.py"), "--out", str(out), "--count-flops-at", "3",
             "--sync-at", "0,2"]  # fmt: skip
    cmd = probe + ["--cpu-peak-reset-noop", "--", str(script), "5"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert len(record["step_times"]) == 5 and record["step_times"] == sorted(record["step_times"])
    assert len(record["cpu_times"]) == 5 and record["cpu_times"] == sorted(record["cpu_times"])
    assert len(record["peak_memory"]) == 5 and min(record["peak_memory"]) > 0
    # One addmm forward (2*8*4*2) and the weight gradient's mm (2*2*8*4); the input needs no gradient.
    assert record["flops_per_step"] == 256 and record["flop_step"] == 3
    assert "end_time" in record
    assert record["synced_steps"] == []  # no GPU: nothing to wait for


@pytest.mark.reference
def test_train_config_follows_the_case(reference, tmp_path: Path) -> None:
    case = TrainCase("t", "tiny", 256, num_frames=4, max_num_objects=2)
    cfg = build_train_config(
        reference.root,
        case,
        device="cpu",
        img_folder=Path("/d/img"),
        gt_folder=Path("/d/gt"),
        init_checkpoint=Path("/d/w.pt"),
        run_dir=Path("/d/run"),
        num_workers=0,
    )
    assert cfg["scratch"]["resolution"] == 256 and cfg["scratch"]["num_frames"] == 4
    assert cfg["scratch"]["max_num_objects"] == 2 and cfg["scratch"]["train_batch_size"] == 1
    trainer = cfg["trainer"]
    assert trainer["accelerator"] == "cpu" and trainer["distributed"]["backend"] == "gloo"
    assert trainer["optim"]["amp"]["enabled"] is False
    assert trainer["model"]["image_encoder"]["trunk"]["embed_dim"] == 96
    assert trainer["model"]["image_encoder"]["neck"]["backbone_channel_list"] == [768, 384, 192, 96]
    assert trainer["model"]["memory_attention"]["layer"]["cross_attention"]["feat_sizes"] == [16, 16]
    # The MOSE prompt simulation is kept as the official config has it.
    assert trainer["model"]["num_correction_pt_per_frame"] == 7
    assert trainer["model"]["prob_to_use_pt_input_for_train"] == 0.5
    path = write_config(cfg, tmp_path / "bench" / "t.yaml")
    assert path.read_text().startswith("# @package _global_\n")
    assert OmegaConf.to_container(OmegaConf.load(path), resolve=False) == cfg


@pytest.mark.slow
@pytest.mark.reference
def test_train_step_benchmark_runs_both_sides(reference, tmp_path: Path) -> None:
    from benchmarks.bench_train_step import main

    options = "--warmup 1 --iters 1 --repeats 1 --threads 1 --no-flops --cases tiny-256px-1f --resolution 128"
    rows = main([*options.split(), "--results-dir", str(tmp_path), "--timeout", "600"])
    assert (tmp_path / "train_step.md").is_file() and (tmp_path / "train_step.json").is_file()
    (row,) = rows
    assert row["reference_s_per_iter"] is not None, row
    assert row["ours_s_per_iter"] is not None, row


@pytest.mark.slow
@pytest.mark.reference
def test_inference_benchmark_runs_both_sides(reference, tmp_path: Path) -> None:
    from benchmarks.bench_inference import main

    options = "--warmup 0 --iters 1 --repeats 1 --frames 2 --objects 1 --image-size 256 --threads 1"
    rows = main([*options.split(), "--results-dir", str(tmp_path), "--timeout", "600"])
    assert (tmp_path / "inference.md").is_file()
    (row,) = rows
    assert row["reference_video_fps"] is not None, row
    assert row["ours_video_fps"] is not None, row
    assert row["mask_iou"] > 0.9, row


@pytest.mark.slow
@pytest.mark.reference
def test_component_benchmark_runs_both_sides_on_the_same_weights(reference, tmp_path: Path) -> None:
    from benchmarks.bench_components import main

    options = "--quick --threads 1 --profile"
    rows = main([*options.split(), "--results-dir", str(tmp_path), "--workdir", str(tmp_path / "work")])
    assert (tmp_path / "components.md").is_file()
    assert {row["component"] for row in rows} == {"image_encoder", "memory_attention"}
    for row in rows:
        assert row["errors"] is None, row
        assert row["reference_train_ms"] > 0 and row["ours_train_ms"] > 0, row
        assert row["ours_ops"] > 0 and row["reference_ops"] > 0, row
        # Same weights and inputs: in float32 the two sides' eval-mode outputs agree to rounding.
        assert row["output_rel_error"] < 1e-5, row
        assert (tmp_path / f"components_{row['component']}_ours_profile.txt").is_file()


def test_alternating_runs_alternate_sides_and_keep_going_after_a_failure() -> None:
    calls = []

    def run(side: str, run_index: int) -> dict:
        calls.append((side, run_index))
        if (side, run_index) == ("ours", 1):
            raise common.ChildFailed("exit 1: boom")
        return {"side": side, "run": run_index}

    records, errors = common.alternating_runs("case", ["reference", "ours"], 3, run)
    assert calls == [("reference", 0), ("ours", 0), ("ours", 1), ("reference", 1), ("reference", 2), ("ours", 2)]
    assert [r["run"] for r in records["reference"]] == [0, 1, 2]
    assert [r["run"] for r in records["ours"]] == [0, 2]
    assert errors == {"reference": [], "ours": ["exit 1: boom"]}


def test_memory_benchmark_measures_both_sides_on_fake_cuda(reference, tmp_path: Path) -> None:
    from benchmarks.bench_memory import main

    rows = main(["--quick", "--results-dir", str(tmp_path), "--workdir", str(tmp_path / "work")])
    assert (tmp_path / "memory.md").is_file() and (tmp_path / "memory.json").is_file()
    (row,) = rows
    assert row["errors"] is None, row
    assert 0 < row["ours_kept_gib"] <= row["ours_peak_gib"] and 0 < row["reference_kept_gib"] <= row["reference_peak_gib"]
    assert "image_encoder" in row["ours_kept_by_part"], row
    assert row["ours_forward_ops"] > 0 and row["reference_forward_ops"] > 0, row
    record = json.loads((tmp_path / "work" / "tiny-256px-2f" / "ours" / "record.json").read_text())
    assert sum(record["kept_by_part"].values()) == record["kept_bytes"]
    by_part = record["forward_device_by_part"]
    assert record["forward_flops"] == sum(work["flops"] for work in by_part.values()) > 0
    assert record["forward_bytes"] == sum(work["bytes"] for work in by_part.values()) > 0
    assert 0 < row["ours_roofline_ms"] and 0 < row["reference_roofline_ms"], row
    assert record["backward_ops"] > record["forward_ops"] and record["parameter_bytes"] > 0
    assert row["ours_step_peak_gib"] >= row["ours_peak_gib"] and row["reference_step_peak_gib"] >= row["reference_peak_gib"]


@pytest.mark.slow
@pytest.mark.reference
def test_host_ops_benchmark_counts_both_sides_by_part(reference, tmp_path: Path) -> None:
    from benchmarks.bench_host_ops import main

    rows = main(["--quick", "--results-dir", str(tmp_path), "--workdir", str(tmp_path / "work")])
    assert (tmp_path / "host_ops.md").is_file() and (tmp_path / "host_ops.json").is_file()
    (row,) = rows
    assert row["errors"] is None, row
    for side in ("reference", "ours"):
        record = json.loads((tmp_path / "work" / "tiny-64px-2f" / side / "record.json").read_text())
        assert record["forward_ops"] == sum(record["forward_ops_by_part"].values()) > 0
        assert record["backward_ops"] == sum(record["backward_ops_by_part"].values()) > record["forward_ops"]
        assert record["python_calls"] > record["forward_ops"]
        # Every backward op is traced to a part but the engine's seed gradient of the loss.
        assert record["backward_ops_by_part"].get("(untagged)", 0) <= 1, record["backward_ops_by_part"]
        assert {"image_encoder", "sam_mask_decoder", "sam_prompt_encoder", "loss"} <= record["backward_ops_by_part"].keys()


@pytest.mark.slow
@pytest.mark.reference
def test_data_benchmark_writes_its_table_and_times_an_epoch_start(reference, tmp_path: Path) -> None:
    small = ["--clips", "2", "--rounds", "1", "--resolution", "64", "--num-frames", "2", "--frame-size", "48", "64",
             "--videos", "1", "--frames-per-video", "3", "--out", str(tmp_path)]  # fmt: skip
    script = str(Path(__file__).resolve().parent.parent / "benchmarks" / "bench_data.py")
    subprocess.run([sys.executable, script, *small, "--workers", "0"], check=True, capture_output=True, timeout=600)
    (row,) = json.loads((tmp_path / "bench_data.json").read_text())["rows"]
    assert row["workers"] == 0 and row["ours_clips_per_s"] > 0 and row["reference_clips_per_s"] > 0, row
    assert (tmp_path / "bench_data.md").is_file()
    extra = ["--epoch-start", "--workers", "1", "--parent-gib", "0.01"]
    subprocess.run([sys.executable, script, *small, *extra], check=True, capture_output=True, timeout=600)
    (row,) = json.loads((tmp_path / "bench_data_epoch_start.json").read_text())
    assert row["workers"] == 1 and row["fresh_s"] > 0 and row["persistent_s"] > 0, row


def test_node_by_node_backward_gives_the_engines_gradients_and_memory() -> None:
    """The memory probe runs backward node by node (the engine needs a real CUDA context, which
    fake CUDA tensors lack). On real CPU tensors, with the tiny SAM2Train (custom autograd
    Functions, lean-autograd rebuilds, broadcast inputs and all) it must give the engine's
    gradients, free what the engine frees, and peak where the engine peaks."""
    from benchmarks.memory_probe import LiveBytes, node_by_node_backward
    from tests.sam2_train_setup import LOSS, batch_tensors, datapoint, loss_and_grads, visible_model
    from training.loss_fns import CORE_LOSS_KEY, MultiStepMultiMasksAndIous

    batch = datapoint(batch_tensors())
    loss_and_grads(visible_model().train(), batch)  # per-size caches filled before either run counts
    results = []
    for by_node in (False, True):
        model = visible_model().train()
        torch.manual_seed(3)
        live = LiveBytes(device_type="cpu")
        with live:
            losses = MultiStepMultiMasksAndIous(**LOSS)(model(batch), batch.masks)
            core = [losses.pop(CORE_LOSS_KEY)]
            del losses
            live.peak = live.live
            if by_node:
                node_by_node_backward(core)
            else:
                core.pop().backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((live.peak, live.live, grads))
    (engine_peak, engine_after, engine_grads), (peak, after, grads) = results
    assert grads.keys() == engine_grads.keys() and len(grads) > 100
    for name, grad in grads.items():
        torch.testing.assert_close(grad, engine_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert after == engine_after  # the graph is gone: gradients and caches are left
    assert abs(peak - engine_peak) <= 0.001 * engine_peak, (peak, engine_peak)


@pytest.mark.slow
def test_ddp_benchmark_runs_each_setting_on_two_ranks(tmp_path: Path) -> None:
    from benchmarks.bench_ddp import main

    rows = main(["--quick", "--results-dir", str(tmp_path), "--workdir", str(tmp_path / "work")])
    assert (tmp_path / "ddp.md").is_file() and (tmp_path / "ddp.json").is_file()
    assert [row["setting"] for row in rows] == ["default", "no bucket view"]
    for row in rows:
        assert row["errors"] is None, row
        assert row["s_per_iter"] > 0 and row["peak_gib"] > 0 and row["steps_timed"] > 0, row
    records = sorted((tmp_path / "work").glob("*/probe_*.json"))
    assert len(records) == 4  # two ranks per run, one run per setting
