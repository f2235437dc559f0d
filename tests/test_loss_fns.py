from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.reference import assert_close
from training import loss_fns
from training.loss_fns import CORE_LOSS_KEY, MultiStepMultiMasksAndIous

NUM_FRAMES, NUM_OBJECTS, SIZE = 3, 3, 16
# Steps per frame: (number of candidate masks per step); a frame with correction clicks has several.
STEPS_PER_FRAME = [(3, 1, 1), (1,), (3, 3)]

CONFIGS = {
    "defaults": dict(weight_dict={"loss_mask": 20, "loss_dice": 1, "loss_iou": 1}),
    "mose": dict(
        weight_dict={"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1},
        supervise_all_iou=True,
        iou_use_l1_loss=True,
        pred_obj_scores=True,
        focal_gamma_obj_score=0.0,
        focal_alpha_obj_score=-1.0,
    ),
    "obj_scores_best_iou": dict(
        weight_dict={"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1},
        focal_alpha=0.5,
        focal_gamma=1.5,
        supervise_all_iou=False,
        pred_obj_scores=True,
        focal_gamma_obj_score=2.0,
        focal_alpha_obj_score=0.25,
    ),
}


def _make_batch() -> tuple[list[dict[str, list[torch.Tensor]]], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    targets = torch.rand(NUM_FRAMES, NUM_OBJECTS, SIZE, SIZE, generator=gen) > 0.6
    targets[1, 2] = False  # an object absent from a frame
    targets[2, 0] = False
    outputs = []
    for steps in STEPS_PER_FRAME:
        frame: dict[str, list[torch.Tensor]] = {
            "multistep_pred_multimasks_high_res": [],
            "multistep_pred_ious": [],
            "multistep_object_score_logits": [],
        }
        for num_masks in steps:
            frame["multistep_pred_multimasks_high_res"].append(
                torch.randn(NUM_OBJECTS, num_masks, SIZE, SIZE, generator=gen) * 3
            )
            frame["multistep_pred_ious"].append(torch.rand(NUM_OBJECTS, num_masks, generator=gen))
            frame["multistep_object_score_logits"].append(torch.randn(NUM_OBJECTS, 1, generator=gen) * 2)
        outputs.append(frame)
    return outputs, targets


def _leaves(outputs: list[dict[str, list[torch.Tensor]]]) -> list[torch.Tensor]:
    return [t for frame in outputs for key in sorted(frame) for t in frame[key]]


def _losses_and_grads(loss_fn, outputs, targets):
    for t in _leaves(outputs):
        t.requires_grad_(True)
        t.grad = None
    losses = loss_fn(outputs, targets)
    losses[CORE_LOSS_KEY].backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in _leaves(outputs)]
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.fixture(scope="module")
def ref_out(reference):
    outputs, targets = _make_batch()
    return reference.run(
        """
        from training.loss_fns import MultiStepMultiMasksAndIous
        outputs_batch, targets = inputs["outputs"], inputs["targets"]
        leaves = [t for frame in outputs_batch for key in sorted(frame) for t in frame[key]]
        for name, config in inputs["configs"].items():
            for t in leaves:
                t.requires_grad_(True)
                t.grad = None
            loss_fn = MultiStepMultiMasksAndIous(**config)
            losses = loss_fn(outputs_batch, targets)
            losses["core_loss"].backward()
            outputs[name] = {
                "losses": {k: torch.as_tensor(v).detach() for k, v in losses.items()},
                "grads": [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in leaves],
            }
        """,
        outputs=outputs,
        targets=targets,
        configs=CONFIGS,
    )


@pytest.mark.reference
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loss_parts_and_gradients_match_reference(ref_out, name):
    outputs, targets = _make_batch()
    losses, grads = _losses_and_grads(MultiStepMultiMasksAndIous(**CONFIGS[name]), outputs, targets)
    assert_close(losses, ref_out[name]["losses"])
    assert_close(grads, ref_out[name]["grads"])


def test_absent_object_gets_only_the_object_score_loss():
    loss_fn = MultiStepMultiMasksAndIous(**CONFIGS["mose"])
    target = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.bool)
    step = {
        "multistep_pred_multimasks_high_res": [torch.randn(1, 3, SIZE, SIZE, requires_grad=True)],
        "multistep_pred_ious": [torch.rand(1, 3)],
        "multistep_object_score_logits": [torch.tensor([[1.5]])],
    }
    losses = loss_fn([step], target)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_iou"] == 0
    # Plain BCE (alpha -1, gamma 0) against "absent": softplus of the logit.
    torch.testing.assert_close(losses["loss_class"], torch.nn.functional.softplus(torch.tensor(1.5)))
    torch.testing.assert_close(losses[CORE_LOSS_KEY], losses["loss_class"])


def test_weight_dict_errors_name_the_keys():
    with pytest.raises(ValueError, match="loss_dice"):
        MultiStepMultiMasksAndIous({"loss_mask": 20, "loss_iou": 1})
    with pytest.raises(ValueError, match="loss_typo"):
        MultiStepMultiMasksAndIous({"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_typo": 1})


def _rank_losses(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        outputs, targets = _make_batch()
        num_objects = rank + 1  # ranks hold 1 and 2 objects: 1.5 per rank on average
        outputs = [{k: [t[:num_objects] for t in v] for k, v in frame.items()} for frame in outputs]
        losses = MultiStepMultiMasksAndIous(**CONFIGS["mose"])(outputs, targets[:, :num_objects])
        results[rank] = {k: v.detach() for k, v in losses.items()}
    finally:
        dist.destroy_process_group()


def test_normalised_by_objects_averaged_over_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_losses, args=(2, port, results), nprocs=2, join=True)
        results = dict(results)
    outputs, targets = _make_batch()
    loss_fn = MultiStepMultiMasksAndIous(**CONFIGS["mose"])
    for rank in range(2):
        num_objects = rank + 1
        local = [{k: [t[:num_objects] for t in v] for k, v in frame.items()} for frame in outputs]
        single = loss_fn(local, targets[:, :num_objects])
        # Alone, a rank divides by its own count (1 is the floor); together, by the average 1.5.
        expected = {k: v * max(num_objects, 1) / 1.5 for k, v in single.items()}
        assert_close(results[rank], expected)


def _kept_full_size(loss_fn, outputs, targets) -> int:
    """How many `[..., H, W]` tensors autograd keeps for backward, the inputs themselves aside."""
    inputs = {t.untyped_storage().data_ptr() for t in [*_leaves(outputs), targets]}
    kept: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-2:] == (SIZE, SIZE) and t.untyped_storage().data_ptr() not in inputs:
            kept.add(t.untyped_storage().data_ptr())
        return t

    for t in _leaves(outputs):
        t.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(outputs, targets)
    return len(kept)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mask_losses_keep_only_logits_and_targets_for_backward(name):
    """The fused focal and dice terms keep no full-size intermediates (autograd of the written-out
    formulas keeps several per step): only each frame's float targets besides the logits."""
    outputs, targets = _make_batch()
    assert _kept_full_size(MultiStepMultiMasksAndIous(**CONFIGS[name]), outputs, targets) <= NUM_FRAMES


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 1.5), (-1.0, 0.0), (0.25, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_mask_losses_match_the_written_out_losses(alpha, gamma, dtype):
    """`_FocalAndDice` against autograd through `sigmoid_focal_loss` and `dice_loss`: the same
    values and gradients up to rounding, saturated logits included."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, SIZE, SIZE, generator=gen, dtype=torch.float64) * 4
    logits[0, 0, 0, :6] = torch.tensor([30.0, -30.0, 60.0, -60.0, 0.0, 1e-3])
    targets = (torch.rand(3, 1, SIZE, SIZE, generator=gen) > 0.6).to(dtype)
    targets[1] = 0  # an empty object: dice's smoothing terms alone
    grad_focal, grad_dice = torch.randn(2, 3, 3, generator=gen, dtype=dtype)
    num_objects = 2.0

    fused_x = logits.to(dtype).requires_grad_()
    fused = loss_fns._FocalAndDice.apply(fused_x, targets, num_objects, alpha, gamma)
    (fused[0] * grad_focal + fused[1] * grad_dice).sum().backward()

    plain_x = logits.to(dtype).requires_grad_()
    full_targets = targets.expand_as(plain_x)
    plain = (
        loss_fns.sigmoid_focal_loss(plain_x, full_targets, num_objects, alpha, gamma, loss_on_multimask=True),
        loss_fns.dice_loss(plain_x, full_targets, num_objects, loss_on_multimask=True),
    )
    (plain[0] * grad_focal + plain[1] * grad_dice).sum().backward()

    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(fused, plain, **tol)
    torch.testing.assert_close(fused_x.grad, plain_x.grad, **tol)
