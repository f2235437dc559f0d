"""SAM2Train on its own: training mode, correction clicks, edge cases, freezing."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from tests.reference import assert_close
from tests.sam2_train_setup import (
    COMPARED_KEYS,
    IMAGE_SIZE,
    NUM_OBJECTS,
    batch_tensors,
    build,
    datapoint,
    loss_and_grads,
    select_outputs,
    visible_model,
)
from tests.test_optimizer import _mose_optim
from training.loss_fns import CORE_LOSS_KEY
from training.optimizer import GradientClipper, construct_optimizer
from training.utils.data_utils import BatchedVideoDatapoint, BatchedVideoMetaData


def _check_clicks(frames, masks, *, from_gt: bool) -> int:
    """Every correction click against the mask it corrects; returns the number checked."""
    checked = 0
    for t, frame in enumerate(frames):
        gt = masks[t]
        for k in range(1, len(frame["multistep_point_inputs"])):
            points = frame["multistep_point_inputs"][k]
            x, y = points["point_coords"][:, -1].long().unbind(-1)
            label = points["point_labels"][:, -1]
            before = frame["multistep_pred_masks_high_res"][:, k - 1] > 0
            obj = torch.arange(gt.shape[0])
            in_gt, in_pred = gt[obj, y, x], before[obj, y, x]
            if from_gt:
                assert (label == 1).all() and in_gt.all()
            else:
                assert (in_gt & ~in_pred)[label == 1].all(), "positive click outside the false negatives"
                assert (~in_gt & in_pred)[label == 0].all(), "negative click outside the false positives"
            checked += gt.shape[0]
    return checked


@pytest.mark.parametrize("from_gt", [False, True])
def test_training_clicks_correct_the_current_errors(from_gt):
    model = visible_model(
        prob_to_use_pt_input_for_train=1.0, prob_to_use_box_input_for_train=0.0, prob_to_sample_from_gt_for_train=float(from_gt)
    ).train()
    batch = datapoint(batch_tensors())
    checked = 0
    for _ in range(2):
        frames, losses = loss_and_grads(model, batch)
        assert torch.isfinite(losses[CORE_LOSS_KEY])
        steps = [len(f["multistep_pred_ious"]) for f in frames]
        assert steps[0] == 1 + 2 and set(steps) <= {1, 3}
        checked += _check_clicks(frames, batch.masks, from_gt=from_gt)
    assert checked >= 2 * 2 * 2
    grads = {n: p.grad for n, p in model.named_parameters()}
    for prefix in ("image_encoder.trunk.", "sam_mask_decoder.", "memory_attention.", "memory_encoder."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


@pytest.mark.parametrize("prompt", ["click", "box", "mask"])
def test_object_empty_on_a_prompted_frame_gets_no_degenerate_prompt(prompt):
    overrides = {
        "click": dict(prob_to_use_pt_input_for_train=1.0, prob_to_use_box_input_for_train=0.0),
        "box": dict(prob_to_use_pt_input_for_train=1.0, prob_to_use_box_input_for_train=1.0),
        "mask": dict(prob_to_use_pt_input_for_train=0.0),
    }[prompt]
    model = visible_model(num_init_cond_frames_for_train=1, **overrides).train()
    tensors = batch_tensors()
    tensors["masks"][0, 1] = False  # object 1 enters the clip on frame 1
    batch = datapoint(tensors)
    frames, losses = loss_and_grads(model, batch)
    first = frames[0]
    if prompt == "mask":
        assert first["multistep_point_inputs"][0] is None
        assert (first["multistep_object_score_logits"][0][1] < 0).all()
    else:
        labels = first["multistep_point_inputs"][0]["point_labels"]
        assert (labels[1] == -1).all() and (labels[0] != -1).all()
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_one_frame_clip_trains_with_mask_prompts_enabled():
    model = visible_model(
        prob_to_use_pt_input_for_train=0.0, num_init_cond_frames_for_train=2, num_frames_to_correct_for_train=2
    ).train()
    tensors = {k: v[:1] for k, v in batch_tensors().items()}
    batch = BatchedVideoDatapoint(
        img_batch=tensors["img_batch"],
        obj_to_frame_idx=tensors["obj_to_frame_idx"],
        masks=tensors["masks"],
        metadata=BatchedVideoMetaData(
            unique_objects_identifier=torch.zeros(1, NUM_OBJECTS, 3, dtype=torch.long),
            frame_orig_size=torch.full((1, NUM_OBJECTS, 2), IMAGE_SIZE, dtype=torch.long),
        ),
        dict_key="all",
        batch_size=[1],
    )
    frames, losses = loss_and_grads(model, batch)
    # An image is SAM training: a click or box, then the correction clicks.
    assert len(frames) == 1 and len(frames[0]["multistep_pred_ious"]) == 3
    assert frames[0]["multistep_point_inputs"][0] is not None
    assert torch.isfinite(losses[CORE_LOSS_KEY]) and losses["loss_mask"] > 0


def test_short_clip_with_more_prompted_frames_than_it_has():
    model = visible_model(num_init_cond_frames_for_eval=3, num_frames_to_correct_for_eval=4).eval()
    tensors = {k: v[:2] for k, v in batch_tensors().items()}
    batch = BatchedVideoDatapoint(
        img_batch=tensors["img_batch"],
        obj_to_frame_idx=tensors["obj_to_frame_idx"],
        masks=tensors["masks"],
        metadata=BatchedVideoMetaData(
            unique_objects_identifier=torch.zeros(2, NUM_OBJECTS, 3, dtype=torch.long),
            frame_orig_size=torch.full((2, NUM_OBJECTS, 2), IMAGE_SIZE, dtype=torch.long),
        ),
        dict_key="all",
        batch_size=[2],
    )
    frames = model(batch)
    assert [len(f["multistep_pred_ious"]) for f in frames] == [3, 3]


def test_per_frame_backbone_and_checkpointed_clicks_change_nothing():
    batch = datapoint(batch_tensors())
    baseline = visible_model().eval()
    frames, losses = loss_and_grads(baseline, batch)
    grads = {n: p.grad.clone() for n, p in baseline.named_parameters() if p.grad is not None}
    variant = visible_model(forward_backbone_per_frame_for_eval=True, use_act_ckpt_iterative_pt_sampling=True).eval()
    variant.load_state_dict(baseline.state_dict())
    frames2, losses2 = loss_and_grads(variant, batch)
    assert_close(select_outputs(frames2, COMPARED_KEYS), select_outputs(frames, COMPARED_KEYS))
    assert_close({k: v.detach() for k, v in losses2.items()}, {k: v.detach() for k, v in losses.items()})
    assert_close({n: p.grad for n, p in variant.named_parameters() if p.grad is not None}, grads)


def test_freezing_the_image_encoder_keeps_it_bit_identical_and_out_of_the_optimizer():
    model = visible_model(freeze_image_encoder=True).train()
    conf = OmegaConf.create(_mose_optim())
    optim = construct_optimizer(model, conf.optimizer, conf.options, conf.param_group_modifiers)
    before = copy.deepcopy(model.state_dict())
    batch = datapoint(batch_tensors())
    for step in range(2):
        optim.zero_grad(set_to_none=True)
        _, losses = loss_and_grads(model, batch)
        GradientClipper(max_norm=0.1)(model)
        optim.step(where=step / 10, step=step)
    in_optimizer = {id(p) for g in optim.optimizer.param_groups for p in g["params"]}
    changed = 0
    for name, param in model.named_parameters():
        if name.startswith("image_encoder."):
            assert param.grad is None and id(param) not in in_optimizer and param not in optim.optimizer.state
            assert torch.equal(param, before[name]), name
        else:
            changed += not torch.equal(param, before[name])
    assert changed > 100


def test_official_flat_names_read_and_write_the_grouped_policies():
    model = build()
    assert model.train_prompts.prob_to_use_pt_input == model.prob_to_use_pt_input_for_train == 0.5
    assert model.pt_sampling_for_eval == "center" and model.num_correction_pt_per_frame == 2
    model.pt_sampling_for_eval = "uniform"
    model.num_correction_pt_per_frame = 5
    assert model.eval_prompts.point_sampling == "uniform" and model.corrections.num_correction_pt_per_frame == 5
    with pytest.raises(ValueError, match="point sampling"):
        model.pt_sampling_for_eval = "centre"
    # Hydra wraps the ValueError of the constructor.
    with pytest.raises(Exception, match="must be a probability in"):
        build(prob_to_use_box_input_for_train=1.5)
