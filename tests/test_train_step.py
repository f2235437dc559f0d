"""The training step waits for the device only where it reports; bad updates are skipped on the
device (optimizers that take `found_inf`) or on the host (the others), with the same weights."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sam2.modeling.backbones.hieradet import MultiScaleAttention
from tests import sam2_train_setup as setup
from tests.test_trainer_engine import run_in_process
from tests.trainer_fakes import TinyLoss, TinyModel, TinyVideoDataset, collate, trainer_config
from training.engine.step import NonFiniteLossError, TrainStep
from training.loss_fns import MultiStepMultiMasksAndIous
from training.optimizer import GradientClipper, Optimizer

aten = torch.ops.aten
# Ops whose result the host must wait for on a GPU: `_local_scalar_dense` is behind `.item()`,
# `float()` and `.tolist()`, `is_nonzero` behind `bool()`; the others return a Python value or have
# an output size that depends on the values.
WAITING_OPS = {
    aten._local_scalar_dense, aten.is_nonzero, aten.equal,
    aten.nonzero, aten.masked_select, aten._unique2, aten.unique_consecutive,
}  # fmt: skip


# Tensor methods that copy to the host without an op this mode sees (on a CPU tensor, no copy runs).
HOST_COPIES = {"tolist", "numpy", "cpu"}


class DeviceWaits(TorchDispatchMode):
    """Records the qualified names of the Python functions on the stack wherever the host would wait
    for a GPU: at the ops above, and at calls of the tensor methods above (seen by a profile hook)."""

    def __init__(self, trainer=None) -> None:
        super().__init__()
        self.trainer = trainer
        self.stacks: list[set[str]] = []
        self.steps: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        if func.overloadpacket in WAITING_OPS or boolean_index:
            self._record(sys._getframe(1))
        return func(*args, **(kwargs or {}))

    def _profile(self, frame, event, arg) -> None:
        if event == "c_call" and arg.__name__ in HOST_COPIES and isinstance(getattr(arg, "__self__", None), torch.Tensor):
            self._record(frame)

    def _record(self, frame) -> None:
        names = set()
        while frame is not None:
            names.add(frame.f_code.co_qualname)
            frame = frame.f_back
        self.stacks.append(names)
        self.steps.append(self.trainer.steps["train"] if self.trainer is not None else -1)

    def __enter__(self):
        sys.setprofile(self._profile)
        return super().__enter__()

    def __exit__(self, *exc):
        sys.setprofile(None)
        return super().__exit__(*exc)

    def steps_within(self, qualname: str) -> list[int]:
        return [step for step, names in zip(self.steps, self.stacks) if qualname in names]


def make_step(model: nn.Module, loss: nn.Module, optimizer: torch.optim.Optimizer, **options) -> TrainStep:
    return TrainStep(
        model=model,
        loss=nn.ModuleDict({"all": loss}),
        optim=Optimizer(optimizer),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        gradient_clipper=GradientClipper(max_norm=1.0),
        gradient_logger=None,
        device=torch.device("cpu"),
        autocast_dtype=None,
        accumulation_steps=options.get("accumulation_steps", 1),
        max_nonfinite_steps=options.get("max_nonfinite_steps", 5),
    )


def train(step: TrainStep, batch, micro_index: int = 0):
    return step(batch, micro_index=micro_index, is_last_in_epoch=False, where=0.5, rank=0, global_step=micro_index + 1)


@pytest.mark.parametrize("attend_padding", [False, True], ids=["cpu_windows", "gpu_windows"])
def test_sam2train_step_does_not_wait_for_the_device(attend_padding, monkeypatch):
    # Hiera's padded windows take another path off the CPU; both run here.
    monkeypatch.setattr(MultiScaleAttention, "attend_padding", attend_padding)
    torch.manual_seed(0)
    model = setup.build()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = make_step(model, MultiStepMultiMasksAndIous(**setup.LOSS), optimizer)
    batch = setup.datapoint(setup.batch_tensors())
    before = [p.detach().clone() for p in model.parameters()]
    with DeviceWaits() as waits:
        result = train(step, batch)
    assert result.optimizer_stepped and step.skips_on_device
    assert waits.stacks == []
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # The reads happen where they are asked for (and the recorder sees them).
    with DeviceWaits() as waits:
        assert step.report(rank=0) is False
        assert torch.isfinite(result.losses["loss"]) and float(result.grad_norm) > 0
    assert len(waits.stacks) == 3


def test_trainer_waits_for_the_device_only_where_it_reports(tmp_path, monkeypatch):
    config = trainer_config(str(tmp_path), max_epochs=2)  # 4 steps an epoch
    config["logging"].update(log_freq=3, log_scalar_frequency=3)
    recorders = []

    def record(trainer):
        recorders.append(DeviceWaits(trainer))
        return recorders[-1]

    trainer = run_in_process(config, monkeypatch, during_run=record)
    waits = recorders[0]
    assert trainer.train_step.skips_on_device
    assert waits.steps_within("TrainStep.__call__") == []
    # Reads after step 1, every 3rd step, and at the end of each epoch (steps 4 and 8), only.
    reads = set(waits.steps_within("Trainer._train_one_batch"))
    assert reads == {1, 3, 4, 6, 8}, reads


@pytest.mark.parametrize("fused", [True, False], ids=["on_device", "on_host"])
def test_a_nonfinite_loss_leaves_weights_and_optimizer_as_they_were(fused, caplog):
    torch.manual_seed(0)
    model = TinyModel(dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=not fused)
    step = make_step(model, TinyLoss(nan_on_calls=[1]), optimizer)
    assert step.skips_on_device is fused
    dataset = TinyVideoDataset(2, noise=0.0)
    batch = collate([dataset[0], dataset[1]])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    with caplog.at_level(logging.WARNING):
        train(step, batch)
        step.report(rank=0)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert all(int(state.get("step", 0)) == 0 for state in optimizer.state.values())
    assert "rank 0, step 1: non-finite loss" in caplog.text and "videos [0, 1]" in caplog.text

    train(step, batch)
    assert all(int(state["step"]) == 1 for state in optimizer.state.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_both_skip_paths_end_with_the_same_weights():
    def run(fused: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = TinyModel(dropout=0.0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=not fused)
        step = make_step(model, TinyLoss(nan_on_calls=[2]), optimizer)
        dataset = TinyVideoDataset(4, noise=0.0)
        for index in range(3):
            train(step, collate([dataset[index]]))
        step.report(rank=0)
        return model.state_dict()

    on_device, on_host = run(True), run(False)
    for name in on_device:
        torch.testing.assert_close(on_device[name], on_host[name], rtol=1e-6, atol=1e-7)


def test_a_nonfinite_batch_skips_the_whole_accumulated_update_on_the_device():
    torch.manual_seed(0)
    model = TinyModel(dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    step = make_step(model, TinyLoss(nan_on_calls=[1]), optimizer, accumulation_steps=2)
    dataset = TinyVideoDataset(2, noise=0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert not train(step, collate([dataset[0]]), micro_index=0).optimizer_stepped
    assert train(step, collate([dataset[1]]), micro_index=1).optimizer_stepped
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    # The next update, with finite losses only, moves the weights.
    train(step, collate([dataset[0]]), micro_index=2)
    train(step, collate([dataset[1]]), micro_index=3)
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_nonfinite_losses_in_a_row_stop_the_run_where_they_are_read():
    torch.manual_seed(0)
    model = TinyModel(dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    step = make_step(model, TinyLoss(nan_on_calls=[2, 3]), optimizer, max_nonfinite_steps=2)
    batch = collate([TinyVideoDataset(1)[0]])
    for _ in range(3):
        train(step, batch)
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        step.report(rank=0)


def test_a_loss_without_a_graph_skips_the_update_on_the_device(caplog):
    torch.manual_seed(0)
    model = TinyModel(dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)

    class Detached(TinyLoss):
        def forward(self, outputs, targets):
            return {name: value.detach() for name, value in super().forward(outputs, targets).items()}

    step = make_step(model, Detached(), optimizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with caplog.at_level(logging.INFO):
        assert train(step, collate([TinyVideoDataset(1)[0]])).optimizer_stepped
        assert step.report(rank=0) is True
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert "does not depend on any trainable weight" in caplog.text
