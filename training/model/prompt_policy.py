"""Which prompts a training clip gets: the policy (from the config) and the plan (per clip).

`SAM2Train` accepts the official flat keywords (`prob_to_use_pt_input_for_train`, ...) and turns
them at once into two `PromptPolicy` objects, one for training and one for evaluation, plus the
mode-independent `CorrectionOptions`. `plan_prompts` then draws, for one clip, the conditioning
frames, the kind of prompt (mask, box or click) and the frames that get correction clicks.

The random decisions are drawn from a numpy generator in the official order, so the same seed
gives the same decisions as the official trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import Tensor

from training.model.prompt_sampling import sample_box_points, sample_initial_click

POINT_SAMPLING_METHODS = ("uniform", "center")


@dataclass(frozen=True)
class PromptPolicy:
    """How one mode (train or eval) prompts a clip.

    Attributes:
        prob_to_use_pt_input: probability that a clip is prompted by clicks or boxes rather than
            by ground-truth masks (clicks also allow correction clicks).
        prob_to_use_box_input: given point input, probability that a prompted frame gets a box
            instead of one click.
        num_frames_to_correct: frames (prompted ones first) that get correction clicks.
        rand_frames_to_correct: draw that number uniformly in [num prompted frames, the maximum].
        num_init_cond_frames: prompted frames: the first frame plus others drawn at random.
        rand_init_cond_frames: draw that number uniformly in [1, the maximum].
        point_sampling: `"uniform"` (random error pixel) or `"center"` (deepest error pixel).
        prob_to_sample_from_gt: probability that a correction click comes from the ground truth
            instead of the prediction's errors.
    """

    prob_to_use_pt_input: float = 0.0
    prob_to_use_box_input: float = 0.0
    num_frames_to_correct: int = 1
    rand_frames_to_correct: bool = False
    num_init_cond_frames: int = 1
    rand_init_cond_frames: bool = False
    point_sampling: str = "uniform"
    prob_to_sample_from_gt: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prob_to_use_pt_input", "prob_to_use_box_input", "prob_to_sample_from_gt"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if self.num_init_cond_frames < 1:
            raise ValueError(f"num_init_cond_frames must be >= 1 (the first frame is always prompted), got {self.num_init_cond_frames}")
        if self.point_sampling not in POINT_SAMPLING_METHODS:
            raise ValueError(f"point sampling must be one of {POINT_SAMPLING_METHODS}, got {self.point_sampling!r}")
        if self.prob_to_use_pt_input > 0 and self.num_frames_to_correct < self.num_init_cond_frames:
            raise ValueError(
                f"num_frames_to_correct ({self.num_frames_to_correct}) must be >= num_init_cond_frames "
                f"({self.num_init_cond_frames}): every prompted frame also receives correction clicks"
            )


@dataclass(frozen=True)
class CorrectionOptions:
    """Correction clicks, the same in both modes.

    Attributes:
        num_correction_pt_per_frame: clicks added one by one on each frame to correct.
        add_all_frames_to_correct_as_cond: a corrected frame becomes a conditioning frame.
        use_act_ckpt_iterative_pt_sampling: activation checkpointing of the single-mask
            correction passes (saves memory, costs a recomputation).
    """

    num_correction_pt_per_frame: int = 7
    add_all_frames_to_correct_as_cond: bool = False
    use_act_ckpt_iterative_pt_sampling: bool = False


@dataclass
class PromptPlan:
    """The prompts of one clip, frame indices into the clip.

    Attributes:
        use_pt_input: clicks / boxes (True) or masks (False) on the prompted frames.
        init_cond_frames: prompted frames, the start frame first.
        frames_not_in_init_cond: the others, in time order.
        frames_to_add_correction_pt: frames receiving correction clicks.
        point_inputs_per_frame: `{t: {"point_coords": [N, P, 2], "point_labels": [N, P]}}`.
        mask_inputs_per_frame: `{t: [N, 1, H, W]}` bool ground truth used as prompt.
    """

    use_pt_input: bool
    init_cond_frames: list[int]
    frames_not_in_init_cond: list[int]
    frames_to_add_correction_pt: list[int]
    point_inputs_per_frame: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    mask_inputs_per_frame: dict[int, Tensor] = field(default_factory=dict)


class PolicyField:
    """An official flat attribute (e.g. `model.pt_sampling_for_eval`) kept on a grouped field.

    Reading returns the field; assigning replaces the (frozen, validated) group.
    """

    def __init__(self, group: str, name: str) -> None:
        self.group, self.name = group, name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(getattr(obj, self.group), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj, self.group, replace(getattr(obj, self.group), **{self.name: value}))


def _single_frame_policy(policy: PromptPolicy) -> PromptPolicy:
    """One-frame clips (images) are SAM training: always clicks or boxes, one frame to correct.

    A mask prompt on the only frame would hand the model its own target.
    """
    return PromptPolicy(
        prob_to_use_pt_input=1.0,
        prob_to_use_box_input=policy.prob_to_use_box_input,
        num_frames_to_correct=1,
        rand_frames_to_correct=policy.rand_frames_to_correct,
        num_init_cond_frames=1,
        rand_init_cond_frames=policy.rand_init_cond_frames,
        point_sampling=policy.point_sampling,
        prob_to_sample_from_gt=policy.prob_to_sample_from_gt,
    )


def plan_prompts(
    policy: PromptPolicy, gt_masks_per_frame: dict[int, Tensor], num_frames: int, rng: np.random.Generator, start_frame_idx: int = 0
) -> PromptPlan:
    """Draw the prompts of one clip.

    Args:
        policy: the mode's prompt policy.
        gt_masks_per_frame: `{t: [N, 1, H, W]}` bool ground truth.
        num_frames: clip length T.
        rng: source of the random decisions (official order of draws).
        start_frame_idx: first frame to track (earlier frames are ignored).
    """
    if num_frames == 1:
        policy = _single_frame_policy(policy)
    available = num_frames - start_frame_idx
    # Short clips cannot hold more prompted or corrected frames than they have.
    num_init_cond = min(policy.num_init_cond_frames, available)
    num_to_correct = min(policy.num_frames_to_correct, available)
    use_pt_input = bool(rng.random() < policy.prob_to_use_pt_input)
    if policy.rand_init_cond_frames and num_init_cond > 1:
        num_init_cond = int(rng.integers(1, num_init_cond, endpoint=True))
    if use_pt_input and policy.rand_frames_to_correct and num_to_correct > num_init_cond:
        num_to_correct = int(rng.integers(num_init_cond, num_to_correct, endpoint=True))

    init_cond_frames = [start_frame_idx]
    if num_init_cond > 1:
        others = rng.choice(range(start_frame_idx + 1, num_frames), num_init_cond - 1, replace=False)
        init_cond_frames += others.tolist()
    plan = PromptPlan(
        use_pt_input=use_pt_input,
        init_cond_frames=init_cond_frames,
        frames_not_in_init_cond=[t for t in range(start_frame_idx, num_frames) if t not in init_cond_frames],
        frames_to_add_correction_pt=[],
    )
    for t in init_cond_frames:
        if not use_pt_input:
            plan.mask_inputs_per_frame[t] = gt_masks_per_frame[t]
        elif rng.random() < policy.prob_to_use_box_input:
            points, labels = sample_box_points(gt_masks_per_frame[t])
            plan.point_inputs_per_frame[t] = {"point_coords": points, "point_labels": labels}
        else:
            points, labels = sample_initial_click(gt_masks_per_frame[t], policy.point_sampling)
            plan.point_inputs_per_frame[t] = {"point_coords": points, "point_labels": labels}

    if use_pt_input:
        # Mask prompts are exact already; only clicks and boxes get corrected.
        num_to_correct = max(num_to_correct, num_init_cond)
        extra = num_to_correct - num_init_cond
        plan.frames_to_add_correction_pt = list(init_cond_frames)
        if extra > 0:
            plan.frames_to_add_correction_pt += rng.choice(plan.frames_not_in_init_cond, extra, replace=False).tolist()
    return plan
