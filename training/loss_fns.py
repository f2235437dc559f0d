"""The SAM 2 training loss: every prediction step of every frame, supervised.

For one frame, the model returns a list with one entry per prediction step (the initial prompt,
then each correction click). Each step holds M candidate masks (M = 3 with multimask output,
else 1), their predicted IoUs and one object-score logit per object. The loss per step is

    20 * focal + 1 * dice    on the candidate with the lowest focal + dice (as in SAM),
    1 * IoU regression       against the real IoU of that candidate (or of all candidates),
    1 * object-score focal   whether the object is visible at all,

with the mask parts switched off for objects absent from the frame. All parts are divided by
the number of objects per GPU (averaged across ranks) so that the gradient scale does not depend
on how many objects a batch happens to hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# The key of the weighted sum that the trainer back-propagates; the other keys are for logging.
CORE_LOSS_KEY = "core_loss"

LOSS_PARTS = ("loss_mask", "loss_dice", "loss_iou", "loss_class")


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    num_objects: float | Tensor,
    alpha: float = 0.25,
    gamma: float = 2,
    loss_on_multimask: bool = False,
) -> Tensor:
    """Focal loss (RetinaNet, arXiv:1708.02002) on logits, divided by `num_objects`.

    Args:
        inputs: logits, `[N, M, H, W]` with `loss_on_multimask`, else `[N, ...]`.
        targets: 0/1 floats of the same shape.
        alpha: weight of positives in [0, 1]; negative turns class weighting off.
        gamma: focusing exponent; 0 gives plain binary cross-entropy.
    Returns:
        `[N, M]` (mean over pixels per candidate) with `loss_on_multimask`, else a scalar
        (mean over the trailing elements, summed over objects).
    """
    prob = inputs.sigmoid()
    bce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    prob_of_truth = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * ((1 - prob_of_truth) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if loss_on_multimask:
        assert loss.dim() == 4, f"multimask focal loss expects [N, M, H, W], got {tuple(loss.shape)}"
        return loss.flatten(2).mean(-1) / num_objects
    return loss.mean(1).sum() / num_objects


def dice_loss(inputs: Tensor, targets: Tensor, num_objects: float | Tensor, loss_on_multimask: bool = False) -> Tensor:
    """Soft Dice loss `1 - (2|P∩T| + 1) / (|P| + |T| + 1)` on sigmoid probabilities.

    Args:
        inputs: logits, `[N, M, H, W]` with `loss_on_multimask`, else `[N, ...]`.
        targets: 0/1 floats of the same shape.
    Returns:
        `[N, M]` divided by `num_objects` with `loss_on_multimask`, else the scalar sum over
        objects divided by `num_objects`.
    """
    prob = inputs.sigmoid()
    if loss_on_multimask:
        assert prob.dim() == 4 and targets.dim() == 4, "multimask dice loss expects [N, M, H, W]"
        prob, targets = prob.flatten(2), targets.flatten(2)
    else:
        prob, targets = prob.flatten(1), targets.flatten(1)
    overlap = (prob * targets).sum(-1)
    total = prob.sum(-1) + targets.sum(-1)
    loss = 1 - (2 * overlap + 1) / (total + 1)
    return loss / num_objects if loss_on_multimask else loss.sum() / num_objects


def iou_loss(
    inputs: Tensor,
    targets: Tensor,
    pred_ious: Tensor,
    num_objects: float | Tensor,
    loss_on_multimask: bool = False,
    use_l1_loss: bool = False,
) -> Tensor:
    """Regression of the IoU head towards the real IoU of each thresholded candidate mask.

    Args:
        inputs: mask logits `[N, M, H, W]` (a pixel is foreground where the logit is > 0).
        targets: ground truth `[N, M, H, W]`.
        pred_ious: the IoU head's predictions `[N, M]`.
        use_l1_loss: L1 instead of squared error.
    Returns:
        `[N, M] / num_objects` with `loss_on_multimask`, else the scalar sum / `num_objects`.
    """
    assert inputs.dim() == 4 and targets.dim() == 4, "IoU loss expects [N, M, H, W] masks"
    pred = inputs.flatten(2) > 0
    truth = targets.flatten(2) > 0
    intersection = (pred & truth).sum(dim=-1).float()
    union = (pred | truth).sum(dim=-1).float()
    # An empty prediction of an empty object counts as IoU 0, as in the official recipe.
    real_ious = intersection / union.clamp(min=1.0)
    regression = F.l1_loss if use_l1_loss else F.mse_loss
    loss = regression(pred_ious, real_ious, reduction="none")
    return loss / num_objects if loss_on_multimask else loss.sum() / num_objects


class _FocalAndDice(torch.autograd.Function):
    """`sigmoid_focal_loss` and `dice_loss` (multimask) of every candidate mask, for 0/1 targets.

    `apply(logits [N, M, H, W], targets [N, 1 or M, H, W], num_objects, alpha, gamma)` returns
    focal and dice `[N, M]`, each divided by `num_objects`: the values of those two functions up
    to float rounding, in a dozen passes over the logits instead of about thirty. Backward takes
    the gradient in closed form from the logits and targets, the only full-size tensors it keeps
    (autograd of the written-out formulas keeps about six per step). For a 0/1 target t, with
    p = sigmoid(x), q = |t - p| (one minus the probability of the truth) and
    c = softplus((1 - 2t) x) (the cross-entropy):

        focal = mean(alpha_t q^gamma c)        d/dx = (1 - 2t) alpha_t q^gamma (gamma (1 - q) c + q)
        dice = 1 - (2 o + 1) / (s + 1)         d/dx = ((2 o + 1) - 2 t (s + 1)) / (s + 1)^2 q (1 - q)

    where alpha_t = alpha for t = 1 and 1 - alpha for t = 0 (1 when alpha < 0), o = sum p t,
    s = sum p + sum t, sums over the pixels of one candidate, and q (1 - q) = p (1 - p).
    Ground-truth masks are boolean, so the targets are 0/1.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, num_objects: float | Tensor, alpha: float, gamma: float):
        x, t = _FocalAndDice._flat(logits), _FocalAndDice._flat(targets)
        prob, q, cross_entropy = _FocalAndDice._terms(x, t)
        focal = (q.pow(gamma) * cross_entropy * _FocalAndDice._alpha_t(t, alpha)).mean(-1) / num_objects
        overlap = (prob * t).sum(-1)
        total = prob.sum(-1) + t.sum(-1)
        dice = (1 - (2 * overlap + 1) / (total + 1)) / num_objects
        ctx.save_for_backward(logits, targets, overlap, total)
        ctx.num_objects, ctx.alpha, ctx.gamma = num_objects, alpha, gamma
        return focal, dice

    @staticmethod
    def backward(ctx, grad_focal: Tensor, grad_dice: Tensor):
        logits, targets, overlap, total = ctx.saved_tensors
        x, t = _FocalAndDice._flat(logits), _FocalAndDice._flat(targets)
        _, q, cross_entropy = _FocalAndDice._terms(x, t)
        one_minus_q = 1 - q
        focal_scale = (grad_focal / (ctx.num_objects * x.shape[-1])).unsqueeze(-1)
        grad = torch.addcmul(q, one_minus_q, cross_entropy, value=ctx.gamma)
        if ctx.gamma != 0:
            grad *= q.pow(ctx.gamma)
        grad *= (1 - 2 * t) * _FocalAndDice._alpha_t(t, ctx.alpha)
        grad *= focal_scale
        dice_scale = (grad_dice / ctx.num_objects).unsqueeze(-1)
        denominator = (total + 1).unsqueeze(-1)
        constant = (2 * overlap + 1).unsqueeze(-1) / denominator**2 * dice_scale
        per_target = 2 / denominator * dice_scale
        grad += (constant - per_target * t) * (q * one_minus_q)
        return grad.view_as(logits).to(logits.dtype), None, None, None, None

    @staticmethod
    def _flat(x: Tensor) -> Tensor:
        """`[N, M, P]` in float32 at least (half-precision logits are computed in float32)."""
        return x.to(torch.promote_types(x.dtype, torch.float32)).flatten(2)

    @staticmethod
    def _terms(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`(p, q, c)` of the class docstring."""
        prob = x.sigmoid()
        return prob, (t - prob).abs_(), F.softplus((1 - 2 * t) * x)

    @staticmethod
    def _alpha_t(t: Tensor, alpha: float) -> Tensor | float:
        return (2 * alpha - 1) * t + (1 - alpha) if alpha >= 0 else 1.0


def _objects_per_rank(num_local_objects: int, device: torch.device) -> float | Tensor:
    """Objects per GPU, averaged over all ranks, at least 1 (the loss normaliser).

    A float in a single process; across ranks a 0-d tensor on `device`, left there so that the
    step does not wait for the all-reduce on the host (no `.item()`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return max(float(num_local_objects), 1.0)
    count = torch.tensor(num_local_objects, device=device, dtype=torch.float)
    dist.all_reduce(count)
    return torch.clamp(count / dist.get_world_size(), min=1)


class MultiStepMultiMasksAndIous(nn.Module):
    """Focal + Dice + IoU + object-score loss over all prediction steps of all frames.

    Args:
        weight_dict: weights of `loss_mask` (focal), `loss_dice`, `loss_iou` and optionally
            `loss_class` (object score; 0 when absent) in the core loss.
        focal_alpha, focal_gamma: focal-loss parameters of the mask loss.
        supervise_all_iou: regress the IoU of every candidate mask, not only of the best one.
        iou_use_l1_loss: L1 instead of squared error for the IoU regression.
        pred_obj_scores: supervise the object-score logits (and mask only visible objects).
        focal_gamma_obj_score, focal_alpha_obj_score: focal parameters of the object-score loss.
    """

    def __init__(
        self,
        weight_dict: Mapping[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2,
        supervise_all_iou: bool = False,
        iou_use_l1_loss: bool = False,
        pred_obj_scores: bool = False,
        focal_gamma_obj_score: float = 0.0,
        focal_alpha_obj_score: float = -1,
    ) -> None:
        super().__init__()
        weights = dict(weight_dict)
        missing = [k for k in LOSS_PARTS[:3] if k not in weights]
        unknown = [k for k in weights if k not in LOSS_PARTS]
        if missing or unknown:
            raise ValueError(
                f"weight_dict needs the keys {list(LOSS_PARTS[:3])} (and optionally 'loss_class'); "
                f"missing {missing}, unknown {unknown} in {weights}"
            )
        weights.setdefault("loss_class", 0.0)
        self.weight_dict = weights
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.supervise_all_iou = supervise_all_iou
        self.iou_use_l1_loss = iou_use_l1_loss
        self.pred_obj_scores = pred_obj_scores
        self.focal_gamma_obj_score = focal_gamma_obj_score
        self.focal_alpha_obj_score = focal_alpha_obj_score

    def forward(self, outs_batch: Sequence[Mapping[str, list[Tensor]]], targets_batch: Tensor) -> dict[str, Tensor]:
        """Sum of the per-frame losses.

        Args:
            outs_batch: one dict per frame (T of them) with the lists, one entry per step, of
                `multistep_pred_multimasks_high_res` `[N, M, H, W]`, `multistep_pred_ious`
                `[N, M]` and `multistep_object_score_logits` `[N, 1]`.
            targets_batch: ground-truth masks `[T, N, H, W]`.
        Returns:
            `loss_mask`, `loss_dice`, `loss_iou`, `loss_class` and the weighted `core_loss`.
        """
        if len(outs_batch) != len(targets_batch):
            raise ValueError(f"got outputs for {len(outs_batch)} frames but targets for {len(targets_batch)}")
        num_objects = _objects_per_rank(targets_batch.shape[1], targets_batch.device)
        totals: dict[str, Tensor] = {}
        for frame_outputs, frame_targets in zip(outs_batch, targets_batch):
            for key, value in self._frame_losses(frame_outputs, frame_targets, num_objects).items():
                totals[key] = totals[key] + value if key in totals else value
        return totals

    def _frame_losses(self, outputs: Mapping[str, list[Tensor]], targets: Tensor, num_objects: float | Tensor) -> dict[str, Tensor]:
        """Losses of one frame, summed over its prediction steps; `targets` is `[N, H, W]`."""
        target_masks = targets.unsqueeze(1).float()
        steps = list(
            zip(
                outputs["multistep_pred_multimasks_high_res"],
                outputs["multistep_pred_ious"],
                outputs["multistep_object_score_logits"],
                strict=True,
            )
        )
        losses: dict[str, Tensor | float] = dict.fromkeys(LOSS_PARTS, 0)
        for masks, ious, object_score_logits in steps:
            for key, value in self._step_losses(masks, target_masks, ious, object_score_logits, num_objects).items():
                losses[key] = losses[key] + value
        losses[CORE_LOSS_KEY] = self.reduce_loss(losses)
        return losses

    def _step_losses(
        self, masks: Tensor, target_masks: Tensor, ious: Tensor, object_score_logits: Tensor, num_objects: float | Tensor
    ) -> dict[str, Tensor]:
        """Losses of one step: `masks` `[N, M, H, W]`, `target_masks` `[N, 1, H, W]`, `ious` `[N, M]`."""
        focal, dice = _FocalAndDice.apply(masks, target_masks, num_objects, self.focal_alpha, self.focal_gamma)
        target_masks = target_masks.expand_as(masks)
        iou = iou_loss(masks, target_masks, ious, num_objects, loss_on_multimask=True, use_l1_loss=self.iou_use_l1_loss)

        if self.pred_obj_scores:
            object_present = (target_masks[:, 0] > 0).flatten(1).any(dim=-1, keepdim=True).float()
            loss_class = sigmoid_focal_loss(
                object_score_logits,
                object_present,
                num_objects,
                alpha=self.focal_alpha_obj_score,
                gamma=self.focal_gamma_obj_score,
            )
        else:
            object_present = torch.ones(focal.shape[0], 1, dtype=focal.dtype, device=focal.device)
            loss_class = torch.tensor(0.0, dtype=focal.dtype, device=focal.device)

        if masks.shape[1] > 1:
            # Only the candidate closest to the truth is trained, so the others stay free to
            # cover the other plausible readings of an ambiguous prompt.
            combined = focal * self.weight_dict["loss_mask"] + dice * self.weight_dict["loss_dice"]
            best = combined.argmin(dim=-1, keepdim=True)
            focal, dice = focal.gather(1, best), dice.gather(1, best)
            iou = iou.mean(dim=-1, keepdim=True) if self.supervise_all_iou else iou.gather(1, best)

        # Absent objects are trained by the object score only.
        return {
            "loss_mask": (focal * object_present).sum(),
            "loss_dice": (dice * object_present).sum(),
            "loss_iou": (iou * object_present).sum(),
            "loss_class": loss_class,
        }

    def reduce_loss(self, losses: Mapping[str, Tensor | float]) -> Tensor | float:
        """The weighted sum of the loss parts whose weight is non-zero."""
        core: Tensor | float = 0.0
        for key, weight in self.weight_dict.items():
            if weight != 0:
                core = core + losses[key] * weight
        return core
