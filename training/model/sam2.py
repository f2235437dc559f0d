"""SAM2Train: SAM 2 with simulated user prompts and correction clicks, for training.

A training clip is tracked as a user would: some frames are prompted (ground-truth mask, a noisy
box, or a click), the model predicts, and on the frames to correct it receives up to
`num_correction_pt_per_frame` further clicks, each drawn from where its current prediction is
wrong, each followed by one more pass of the SAM heads. Every pass is returned, so the loss
supervises the whole interaction (see `training.loss_fns.MultiStepMultiMasksAndIous`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint
from torch import Tensor

from sam2.modeling.sam2_base import SAM2Base
from sam2.modeling.tracking.sam_heads import SamHeadOutputs
from sam2.utils.misc import concat_points
from training.model.prompt_policy import (
    CorrectionOptions,
    PolicyField,
    PromptPolicy,
    plan_prompts,
)
from training.model.prompt_sampling import get_next_point
from training.utils.data_utils import BatchedVideoDatapoint

# Per-step outputs, one list entry per SAM-head pass on a frame.
MULTISTEP_KEYS = {
    "multistep_pred_multimasks": "low_res_multimasks",
    "multistep_pred_multimasks_high_res": "high_res_multimasks",
    "multistep_pred_ious": "ious",
    "multistep_object_score_logits": "object_score_logits",
}


class SAM2Train(SAM2Base):
    """`SAM2Base` plus prompt simulation; the official training keywords, grouped.

    Keywords ending in `_for_train` / `_for_eval` form `self.train_prompts` / `self.eval_prompts`
    (see `PromptPolicy`); `pt_sampling_for_eval` picks the eval click sampler (training always
    samples uniformly). `forward_backbone_per_frame_for_eval` computes image features frame by
    frame in eval (long videos); `freeze_image_encoder` turns off its gradients. Everything else
    goes to `SAM2Base`.
    """

    def __init__(
        self,
        image_encoder: torch.nn.Module,
        memory_attention: torch.nn.Module | None = None,
        memory_encoder: torch.nn.Module | None = None,
        prob_to_use_pt_input_for_train: float = 0.0,
        prob_to_use_pt_input_for_eval: float = 0.0,
        prob_to_use_box_input_for_train: float = 0.0,
        prob_to_use_box_input_for_eval: float = 0.0,
        num_frames_to_correct_for_train: int = 1,
        num_frames_to_correct_for_eval: int = 1,
        rand_frames_to_correct_for_train: bool = False,
        rand_frames_to_correct_for_eval: bool = False,
        num_init_cond_frames_for_train: int = 1,
        num_init_cond_frames_for_eval: int = 1,
        rand_init_cond_frames_for_train: bool = True,
        rand_init_cond_frames_for_eval: bool = False,
        add_all_frames_to_correct_as_cond: bool = False,
        num_correction_pt_per_frame: int = 7,
        pt_sampling_for_eval: str = "center",
        prob_to_sample_from_gt_for_train: float = 0.0,
        use_act_ckpt_iterative_pt_sampling: bool = False,
        forward_backbone_per_frame_for_eval: bool = False,
        freeze_image_encoder: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_encoder, memory_attention, memory_encoder, **kwargs)
        self.train_prompts = PromptPolicy(
            prob_to_use_pt_input=prob_to_use_pt_input_for_train,
            prob_to_use_box_input=prob_to_use_box_input_for_train,
            num_frames_to_correct=num_frames_to_correct_for_train,
            rand_frames_to_correct=rand_frames_to_correct_for_train,
            num_init_cond_frames=num_init_cond_frames_for_train,
            rand_init_cond_frames=rand_init_cond_frames_for_train,
            point_sampling="uniform",
            prob_to_sample_from_gt=prob_to_sample_from_gt_for_train,
        )
        self.eval_prompts = PromptPolicy(
            prob_to_use_pt_input=prob_to_use_pt_input_for_eval,
            prob_to_use_box_input=prob_to_use_box_input_for_eval,
            num_frames_to_correct=num_frames_to_correct_for_eval,
            rand_frames_to_correct=rand_frames_to_correct_for_eval,
            num_init_cond_frames=num_init_cond_frames_for_eval,
            rand_init_cond_frames=rand_init_cond_frames_for_eval,
            point_sampling=pt_sampling_for_eval,
        )
        self.corrections = CorrectionOptions(
            num_correction_pt_per_frame=num_correction_pt_per_frame,
            add_all_frames_to_correct_as_cond=add_all_frames_to_correct_as_cond,
            use_act_ckpt_iterative_pt_sampling=use_act_ckpt_iterative_pt_sampling,
        )
        self.forward_backbone_per_frame_for_eval = forward_backbone_per_frame_for_eval
        # The same seed on every rank: all ranks draw the same prompt decisions.
        self.rng = np.random.default_rng(seed=42)
        if freeze_image_encoder:
            self.image_encoder.requires_grad_(False)

    # The official flat names, readable and assignable.
    prob_to_use_pt_input_for_train = PolicyField("train_prompts", "prob_to_use_pt_input")
    prob_to_use_pt_input_for_eval = PolicyField("eval_prompts", "prob_to_use_pt_input")
    prob_to_use_box_input_for_train = PolicyField("train_prompts", "prob_to_use_box_input")
    prob_to_use_box_input_for_eval = PolicyField("eval_prompts", "prob_to_use_box_input")
    num_frames_to_correct_for_train = PolicyField("train_prompts", "num_frames_to_correct")
    num_frames_to_correct_for_eval = PolicyField("eval_prompts", "num_frames_to_correct")
    rand_frames_to_correct_for_train = PolicyField("train_prompts", "rand_frames_to_correct")
    rand_frames_to_correct_for_eval = PolicyField("eval_prompts", "rand_frames_to_correct")
    num_init_cond_frames_for_train = PolicyField("train_prompts", "num_init_cond_frames")
    num_init_cond_frames_for_eval = PolicyField("eval_prompts", "num_init_cond_frames")
    rand_init_cond_frames_for_train = PolicyField("train_prompts", "rand_init_cond_frames")
    rand_init_cond_frames_for_eval = PolicyField("eval_prompts", "rand_init_cond_frames")
    pt_sampling_for_eval = PolicyField("eval_prompts", "point_sampling")
    prob_to_sample_from_gt_for_train = PolicyField("train_prompts", "prob_to_sample_from_gt")
    num_correction_pt_per_frame = PolicyField("corrections", "num_correction_pt_per_frame")
    add_all_frames_to_correct_as_cond = PolicyField("corrections", "add_all_frames_to_correct_as_cond")
    use_act_ckpt_iterative_pt_sampling = PolicyField("corrections", "use_act_ckpt_iterative_pt_sampling")

    @property
    def prompt_policy(self) -> PromptPolicy:
        return self.train_prompts if self.training else self.eval_prompts

    def forward(self, input: BatchedVideoDatapoint) -> list[dict[str, Any]]:
        """Track every object through its clip under simulated prompts.

        Args:
            input: the batch; `img_batch [T, B, 3, H, W]`, `masks [T, N, H, W]` for N objects.
        Returns:
            One dict per tracked frame (T, in time order), with `multistep_pred_multimasks_high_res` (list over steps of
            `[N, M, H, W]`), `multistep_pred_ious` (`[N, M]`), `multistep_object_score_logits`
            (`[N, 1]`), their low-res `multistep_pred_multimasks`, `multistep_pred_masks(_high_res)`
            (`[N, S, ...]`, the chosen mask of each of the S steps), `multistep_point_inputs`,
            `pred_masks(_high_res)` (final step) and the frame's memory (`None` for the last
            frame tracked, whose memory nothing reads).
        """
        if self.training or not self.forward_backbone_per_frame_for_eval:
            backbone_out = self.forward_image(input.flat_img_batch)
        else:
            backbone_out = {"backbone_fpn": None, "vision_pos_enc": None}
        backbone_out = self.prepare_prompt_inputs(backbone_out, input)
        return self.forward_tracking(backbone_out, input)

    def prepare_prompt_inputs(self, backbone_out: dict[str, Any], input: BatchedVideoDatapoint, start_frame_idx: int = 0) -> dict[str, Any]:
        """Add this clip's prompt plan to `backbone_out` (official keys, see `PromptPlan`)."""
        gt_masks_per_frame = {t: masks.unsqueeze(1) for t, masks in enumerate(input.masks)}
        plan = plan_prompts(self.prompt_policy, gt_masks_per_frame, input.num_frames, self.rng, start_frame_idx)
        backbone_out.update(vars(plan))
        backbone_out["gt_masks_per_frame"] = gt_masks_per_frame
        backbone_out["num_frames"] = input.num_frames
        return backbone_out

    def _features_of_frame(self, backbone_out: dict[str, Any], input: BatchedVideoDatapoint, t: int, cache: dict) -> tuple:
        """`(vision_feats, vision_pos_embeds, feat_sizes)` for the objects of frame `t`, one entry per object."""
        img_ids = input.flat_obj_to_img_idx[t]
        if backbone_out["backbone_fpn"] is not None:
            if "all" not in cache:
                cache["all"] = self._prepare_backbone_features(backbone_out)[1:]
            feats, pos, sizes = cache["all"]
            if input.img_batch.shape[1] == 1:
                # One video (batch 1, the usual fine-tuning setting): every object of frame t is
                # on image t. Views instead of copies, and backward sums the objects' gradients
                # instead of scattering them back.
                return [x[:, t : t + 1].expand(-1, len(img_ids), -1) for x in feats], [
                    x[:, t : t + 1].expand(-1, len(img_ids), -1) for x in pos
                ], sizes
            return [x[:, img_ids] for x in feats], [x[:, img_ids] for x in pos], sizes
        # Per-frame backbone (eval on long videos): each distinct image once, then per object.
        unique_ids, inverse = torch.unique(img_ids, return_inverse=True)
        _, feats, pos, sizes = self._prepare_backbone_features(self.forward_image(input.flat_img_batch[unique_ids]))
        return [x[:, inverse] for x in feats], [x[:, inverse] for x in pos], sizes

    def forward_tracking(self, backbone_out: dict[str, Any], input: BatchedVideoDatapoint, return_dict: bool = False) -> Any:
        """Track the prompted frames first (they become memory), then the others in time order."""
        init_cond_frames = backbone_out["init_cond_frames"]
        frames_to_correct = backbone_out["frames_to_add_correction_pt"]
        output_dict: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        cache: dict = {}
        order = init_cond_frames + backbone_out["frames_not_in_init_cond"]
        for t in order:
            feats, pos, sizes = self._features_of_frame(backbone_out, input, t, cache)
            current_out = self.track_step(
                frame_idx=t,
                is_init_cond_frame=t in init_cond_frames,
                current_vision_feats=feats,
                current_vision_pos_embeds=pos,
                feat_sizes=sizes,
                point_inputs=backbone_out["point_inputs_per_frame"].get(t),
                mask_inputs=backbone_out["mask_inputs_per_frame"].get(t),
                gt_masks=backbone_out["gt_masks_per_frame"].get(t),
                frames_to_add_correction_pt=frames_to_correct,
                output_dict=output_dict,
                num_frames=backbone_out["num_frames"],
                # No frame reads the last frame's memory and the loss does not see it: skip it
                # (8% of a one-frame step's forward FLOPs), unless the caller wants the bank.
                run_mem_encoder=return_dict or t != order[-1],
            )
            becomes_cond = t in init_cond_frames or (
                self.corrections.add_all_frames_to_correct_as_cond and t in frames_to_correct
            )
            output_dict["cond_frame_outputs" if becomes_cond else "non_cond_frame_outputs"][t] = current_out

        if return_dict:
            return output_dict
        by_frame = {**output_dict["cond_frame_outputs"], **output_dict["non_cond_frame_outputs"]}
        # Object pointers are dropped from the returned outputs: unused by the loss, they would
        # leave DDP waiting for gradients under activation checkpointing.
        return [{k: v for k, v in by_frame[t].items() if k != "obj_ptr"} for t in sorted(by_frame)]

    def track_step(
        self,
        frame_idx: int,
        is_init_cond_frame: bool,
        current_vision_feats: list[Tensor],
        current_vision_pos_embeds: list[Tensor],
        feat_sizes: list[tuple[int, int]],
        point_inputs: dict[str, Tensor] | None,
        mask_inputs: Tensor | None,
        output_dict: dict[str, dict[int, Any]],
        num_frames: int | None,
        track_in_reverse: bool = False,
        run_mem_encoder: bool = True,
        prev_sam_mask_logits: Tensor | None = None,
        frames_to_add_correction_pt: list[int] | None = None,
        gt_masks: Tensor | None = None,
    ) -> dict[str, Any]:
        """`SAM2Base.track_step`, plus correction clicks on `frames_to_add_correction_pt`.

        Args:
            gt_masks: `[N, 1, H, W]` bool ground truth of this frame (needed to correct it).
            (the others as in `SAM2Base.track_step`)
        """
        current_out, sam_outputs, high_res_features, pix_feat = self._track_step(
            frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes,
            point_inputs, mask_inputs, output_dict, num_frames, track_in_reverse, prev_sam_mask_logits,
        )  # fmt: skip
        steps = [SamHeadOutputs(*sam_outputs)]
        all_point_inputs = [point_inputs]
        if frame_idx in (frames_to_add_correction_pt or ()):
            if gt_masks is None:
                raise ValueError(f"frame {frame_idx} is to be corrected but no gt_masks were given")
            self._add_correction_clicks(is_init_cond_frame, gt_masks, high_res_features, pix_feat, steps, all_point_inputs)
            point_inputs = all_point_inputs[-1]

        for key, field in MULTISTEP_KEYS.items():
            current_out[key] = [getattr(step, field) for step in steps]
        current_out["multistep_pred_masks"] = torch.cat([s.low_res_masks for s in steps], dim=1)
        current_out["multistep_pred_masks_high_res"] = torch.cat([s.high_res_masks for s in steps], dim=1)
        current_out["multistep_point_inputs"] = all_point_inputs
        final = steps[-1]
        current_out["pred_masks"] = final.low_res_masks
        current_out["pred_masks_high_res"] = final.high_res_masks
        current_out["obj_ptr"] = final.obj_ptr
        # The memory holds the corrected mask, and knows it came from clicks.
        self._encode_memory_in_output(
            current_vision_feats, feat_sizes, point_inputs, run_mem_encoder,
            final.high_res_masks, final.object_score_logits, current_out,
        )  # fmt: skip
        return current_out

    def _add_correction_clicks(
        self,
        is_init_cond_frame: bool,
        gt_masks: Tensor,
        high_res_features: list[Tensor] | None,
        pix_feat: Tensor,
        steps: list[SamHeadOutputs],
        all_point_inputs: list[dict[str, Tensor] | None],
    ) -> None:
        """Click where the current mask is wrong, decode again; repeat. Appends to the lists."""
        policy = self.prompt_policy
        for _ in range(self.corrections.num_correction_pt_per_frame):
            # Now and then a click from the ground truth alone, so that the model does not learn
            # to expect clicks only on its own mistakes.
            from_gt = policy.prob_to_sample_from_gt > 0 and self.rng.random() < policy.prob_to_sample_from_gt
            current = steps[-1]
            new_points, new_labels = get_next_point(
                gt_masks, None if from_gt else current.high_res_masks > 0, policy.point_sampling
            )
            point_inputs = concat_points(all_point_inputs[-1], new_points, new_labels)
            multimask_output = self._use_multimask(is_init_cond_frame, point_inputs)
            # The mask being corrected goes back in as a dense prompt, as in the interactive demo.
            heads_kwargs = dict(
                backbone_features=pix_feat,
                point_inputs=point_inputs,
                mask_inputs=current.low_res_masks,
                high_res_features=high_res_features,
                multimask_output=multimask_output,
            )
            if self.corrections.use_act_ckpt_iterative_pt_sampling and not multimask_output:
                outputs = torch.utils.checkpoint.checkpoint(self._forward_sam_heads, use_reentrant=False, **heads_kwargs)
            else:
                outputs = self._forward_sam_heads(**heads_kwargs)
            steps.append(SamHeadOutputs(*outputs))
            all_point_inputs.append(point_inputs)
