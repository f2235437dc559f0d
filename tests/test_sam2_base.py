"""SAM2Base tracking equals the official tracker, frame by frame, on a tiny model.

The same scenario driver (the string `DRIVER` below) runs in this process on our model and in the
reference process on the official one, with the same weights and inputs: several objects, a
6-frame clip, prompts by points, box and mask, correction clicks, several prompted frames,
reverse tracking and training mode. Every `track_step` output and every SAM-head call (masks,
IoU predictions, object scores, object pointers) is compared.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sam2.modeling.sam2_base import SAM2Base
from sam2.modeling.tracking.memory_bank import select_closest_cond_frames
from tests.reference import assert_close
from tests.tiny_tracker_configs import IMAGE_SIZE, SAM2_VARIANT, SAM21_TINY

NUM_FRAMES, NUM_OBJECTS = 6, 3


# Runs one scenario with the model's public tracking API; exec'd on both sides.
DRIVER = '''
def features_for_objects(model, image, num_objects):
    """Backbone features of one frame, repeated for each object (as the video predictor does)."""
    backbone_out = model.forward_image(image[None])
    for key in ("backbone_fpn", "vision_pos_enc"):
        backbone_out[key] = [x.expand(num_objects, -1, -1, -1) for x in backbone_out[key]]
    _, feats, pos, sizes = model._prepare_backbone_features(backbone_out)
    return feats, pos, sizes


def run_scenario(model, frames, steps, num_objects, reverse=False, with_grad=False):
    heads = []
    original = model._forward_sam_heads

    def recording(*args, **kwargs):
        out = tuple(original(*args, **kwargs))
        heads.append({"low_res_multimasks": out[0], "ious": out[2], "obj_ptr": out[5], "object_score_logits": out[6]})
        return out

    model._forward_sam_heads = recording
    output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    results = []
    with torch.set_grad_enabled(with_grad):
        for step in steps:
            t, kind = step["frame"], step["kind"]
            feats, pos, sizes = features_for_objects(model, frames[t], num_objects)
            points = None
            if step.get("points") is not None:
                points = {"point_coords": step["points"][0], "point_labels": step["points"][1]}
            prev_logits = None
            if kind == "correct":
                prev_logits = output_dict["non_cond_frame_outputs"].pop(t)["pred_masks"]
            out = model.track_step(
                frame_idx=t,
                is_init_cond_frame=kind == "init",
                current_vision_feats=feats,
                current_vision_pos_embeds=pos,
                feat_sizes=sizes,
                point_inputs=points,
                mask_inputs=step.get("mask"),
                output_dict=output_dict,
                num_frames=len(frames),
                track_in_reverse=reverse,
                prev_sam_mask_logits=prev_logits,
            )
            store = "non_cond_frame_outputs" if kind == "track" else "cond_frame_outputs"
            output_dict[store][t] = out
            results.append({k: v for k, v in out.items() if k not in ("point_inputs", "mask_inputs")})
    del model._forward_sam_heads
    if not with_grad:
        return {"steps": results, "heads": heads}
    # Every output feeds the loss, so gradients flow back through memory, pointers and heads.
    loss = sum(s["pred_masks_high_res"].sigmoid().mean() + s["obj_ptr"].square().mean() for s in results)
    loss = loss + sum(h["ious"].mean() + 0.01 * h["object_score_logits"].mean() for h in heads)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
'''


def _points(seed: int, num_points: int, labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(NUM_OBJECTS, num_points, 2, generator=g) * (IMAGE_SIZE - 1)
    return coords, torch.tensor(labels, dtype=torch.int32).repeat(NUM_OBJECTS, 1)


def _box(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords, labels = _points(seed, 2, [2, 3])
    return torch.stack([coords.min(dim=1).values, coords.max(dim=1).values], dim=1), labels


def _masks() -> torch.Tensor:
    masks = torch.zeros(NUM_OBJECTS, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    masks[0, :, 10:60, 20:90] = True
    masks[1, :, 70:120, 5:50] = True  # the last object's mask is empty: "absent" on frame 0
    return masks


def _track(frames: range, first: dict | None = None) -> list[dict]:
    return ([first] if first else []) + [{"frame": t, "kind": "track"} for t in frames]


SCENARIOS = {
    # One click per object on frame 0 (multimask), tracking, correction click on frame 3.
    "points": {
        "steps": [{"frame": 0, "kind": "init", "points": _points(1, 1, [1])}]
        + _track(range(1, 4))
        + [{"frame": 3, "kind": "correct", "points": _points(2, 1, [1])}]
        + _track(range(4, 6)),
    },
    # A box on frame 0, clicks on frames 5 and 2 (three prompted frames), then tracking.
    "box": {
        "steps": [
            {"frame": 0, "kind": "init", "points": _box(3)},
            {"frame": 5, "kind": "init", "points": _points(4, 2, [1, 0])},
            {"frame": 2, "kind": "init", "points": _points(5, 1, [1])},
        ]
        + _track([1, 3, 4]),
    },
    # Mask prompts on frame 0 (taken as output), then tracking.
    "mask": {"steps": [{"frame": 0, "kind": "init", "mask": _masks()}] + _track(range(1, 6))},
    # Clicks on the last frame, tracking backwards.
    "reverse": {
        "steps": [{"frame": 5, "kind": "init", "points": _points(6, 3, [1, 1, 0])}] + _track(range(4, -1, -1)),
        "reverse": True,
    },
}
# (model, scenario, training mode)
CASES = [
    ("sam2.1", "points", False),
    ("sam2.1", "box", False),
    ("sam2.1", "mask", False),
    ("sam2.1", "reverse", False),
    ("sam2.1", "points", True),
    ("sam2", "points", False),
    ("sam2", "box", False),
    ("sam2", "mask", True),
    ("sam2", "reverse", False),
    ("sam2.1-occluded", "mask", False),
]
# (model, scenario), run in training mode with gradients.
GRADIENT_CASES = [("sam2.1", "points"), ("sam2", "mask")]
# (frame_idx, prompted frames, max_cond_frames_in_attn)
COND_FRAME_SELECTIONS = [
    (4, [0, 2, 7, 9], 2),
    (4, [0, 2, 7, 9], 3),
    (10, [1, 3, 6, 8], 2),
    (0, [2, 5, 9], 2),
    (5, [5], 2),
]
MODELS = {"sam2.1": SAM21_TINY, "sam2": SAM2_VARIANT, "sam2.1-occluded": SAM21_TINY}
# Random object-score heads say "absent" everywhere, which makes every mask trivially equal;
# a raised output bias keeps the objects visible (ARCHITECTURE.md, section 3). The "occluded"
# model instead has every decoded object absent, for the no-object pointer and memory paths.
SCORE_BIAS = {
    "sam2.1": ("sam_mask_decoder.pred_obj_score_head.layers.2.bias", 3.0),
    "sam2": ("sam_mask_decoder.pred_obj_score_head.bias", 3.0),
    "sam2.1-occluded": ("sam_mask_decoder.pred_obj_score_head.layers.2.bias", -10.0),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: on a busy machine, extra threads cost ten times what they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _frames() -> torch.Tensor:
    return torch.randn(NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def _overlapping_logits() -> torch.Tensor:
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(7)) * 20


@pytest.fixture(scope="module")
def ref_out(reference):
    """The official model's weights, its outputs for every case, and a few loose computations."""
    return reference.run(
        """
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        namespace = {"torch": torch}
        exec(inputs["driver"], namespace)
        models = {}
        for seed, (name, cfg) in enumerate(inputs["models"].items()):
            torch.manual_seed(seed)
            model = instantiate(OmegaConf.create(cfg), _recursive_=True)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.02)  # move zero-initialised parameters off zero
                bias_key, shift = inputs["score_bias"][name]
                model.state_dict()[bias_key].add_(shift)
            models[name] = model
            outputs[f"{name}/state_dict"] = model.state_dict()
        outputs["non_overlapping"] = models["sam2"]._apply_non_overlapping_constraints(inputs["overlap_logits"])
        for name, scenario, training in inputs["cases"]:
            model = models[name].train(training)
            outputs[(name, scenario, training)] = namespace["run_scenario"](
                model, inputs["frames"], inputs["scenarios"][scenario]["steps"], inputs["num_objects"],
                reverse=inputs["scenarios"][scenario].get("reverse", False),
            )
        for name, scenario in inputs["gradient_cases"]:
            outputs[("grad", name, scenario)] = namespace["run_scenario"](
                models[name].train(True), inputs["frames"], inputs["scenarios"][scenario]["steps"],
                inputs["num_objects"], with_grad=True,
            )
        from sam2.modeling.sam2_utils import select_closest_cond_frames
        for frame_idx, prompted, limit in inputs["selections"]:
            chosen, rest = select_closest_cond_frames(frame_idx, {t: t for t in prompted}, limit)
            outputs[("select", frame_idx, tuple(prompted), limit)] = (list(chosen), list(rest))
        """,
        driver=DRIVER,
        models=MODELS,
        score_bias=SCORE_BIAS,
        cases=CASES,
        gradient_cases=GRADIENT_CASES,
        selections=COND_FRAME_SELECTIONS,
        scenarios=SCENARIOS,
        frames=_frames(),
        num_objects=NUM_OBJECTS,
        overlap_logits=_overlapping_logits(),
    )


def _run_scenario(*args, **kwargs) -> dict:
    namespace = {"torch": torch}
    exec(DRIVER, namespace)  # noqa: S102  (the very source the reference process runs)
    return namespace["run_scenario"](*args, **kwargs)


def _our_model(name: str, ref_out: dict) -> SAM2Base:
    model = instantiate(OmegaConf.create(MODELS[name]), _recursive_=True)
    model.load_state_dict(ref_out[f"{name}/state_dict"], strict=True)
    return model


@pytest.mark.reference
@pytest.mark.parametrize(
    "name,scenario,training", CASES, ids=[f"{m}-{s}-{'train' if t else 'eval'}" for m, s, t in CASES]
)
def test_track_step_matches_reference(ref_out, name, scenario, training):
    model = _our_model(name, ref_out).train(training)
    spec = SCENARIOS[scenario]
    ours = _run_scenario(model, _frames(), spec["steps"], NUM_OBJECTS, reverse=spec.get("reverse", False))
    ref = ref_out[(name, scenario, training)]
    # Not a degenerate comparison: objects are visible on tracked frames and masks not empty.
    tracked = [s for s, step in zip(ref["steps"], spec["steps"]) if step["kind"] == "track"]
    if name.endswith("occluded"):
        assert all((s["pred_masks"] == -1024).all() for s in tracked)
    else:
        assert all((s["pred_masks"] > -1024).all() and (s["pred_masks"] > 0).any() for s in tracked)
    assert len(ours["heads"]) == len(ref["heads"])
    for i, (o, r) in enumerate(zip(ours["steps"], ref["steps"])):
        assert_close(o, r, rtol=1e-5, atol=1e-5, path=f"step {i} (frame {spec['steps'][i]['frame']})")
    assert_close(ours["heads"], ref["heads"], rtol=1e-5, atol=1e-5, path="sam heads")


@pytest.mark.reference
def test_non_overlapping_constraints_match_reference(ref_out):
    model = _our_model("sam2", ref_out)
    logits = _overlapping_logits()
    assert torch.equal(model._apply_non_overlapping_constraints(logits), ref_out["non_overlapping"])
    assert torch.equal(model._apply_non_overlapping_constraints(logits[:1]), logits[:1])


@pytest.mark.reference
@pytest.mark.parametrize("name,scenario", GRADIENT_CASES, ids=[f"{m}-{s}" for m, s in GRADIENT_CASES])
def test_training_gradients_match_reference(ref_out, name, scenario):
    model = _our_model(name, ref_out).train(True)
    spec = SCENARIOS[scenario]
    ours = _run_scenario(model, _frames(), spec["steps"], NUM_OBJECTS, with_grad=True)
    ref = ref_out[("grad", name, scenario)]
    # Most of the model learns from a tracked clip (the image encoder, memory, heads, pointers).
    assert len(ref) > 0.9 * len(dict(model.named_parameters()))
    assert_close(ours, ref, rtol=1e-5, atol=1e-5, path="grad")


@pytest.mark.reference
@pytest.mark.parametrize("frame_idx,prompted,limit", COND_FRAME_SELECTIONS)
def test_closest_conditioning_frames_match_reference(ref_out, frame_idx, prompted, limit):
    chosen, rest = select_closest_cond_frames(frame_idx, {t: t for t in prompted}, limit)
    assert (list(chosen), list(rest)) == ref_out[("select", frame_idx, tuple(prompted), limit)]


def test_closest_conditioning_frames_need_a_limit_of_two():
    with pytest.raises(ValueError, match="at least 2"):
        select_closest_cond_frames(3, {0: None, 5: None}, 1)


def _build_directly(cfg: dict, **changes) -> SAM2Base:
    """SAM2Base called with the flat keywords itself (errors are not wrapped by Hydra)."""
    parts = ("image_encoder", "memory_attention", "memory_encoder")
    modules = {key: instantiate(OmegaConf.create(cfg[key]), _recursive_=True) for key in parts}
    flat = {k: v for k, v in cfg.items() if k not in parts and k != "_target_"}
    return SAM2Base(**modules, **{**flat, **changes})


def test_flat_keywords_become_option_groups_and_stay_readable():
    model = _build_directly(SAM21_TINY)
    assert model.memory_options.num_maskmem == model.num_maskmem == 4
    assert model.pointer_options.proj_tpos_enc_in_obj_ptrs and model.proj_tpos_enc_in_obj_ptrs
    assert model.head_options.image_size == model.image_size == IMAGE_SIZE
    assert (model.hidden_dim, model.mem_dim, model.num_feature_levels) == (32, 16, 3)
    model.memory_temporal_stride_for_eval = 3  # predictors and users set options by their flat names
    assert model.memory_options.memory_temporal_stride_for_eval == 3
    with pytest.raises(NotImplementedError, match="track_step"):
        model(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))


def test_unknown_or_inconsistent_keywords_are_refused():
    with pytest.raises(TypeError, match="num_mask_mem"):
        _build_directly(SAM21_TINY, num_mask_mem=3)
    with pytest.raises(ValueError, match="add_tpos_enc_to_obj_ptrs=True"):
        _build_directly(SAM21_TINY, add_tpos_enc_to_obj_ptrs=False)
    with pytest.raises(ValueError, match="fixed_no_obj_ptr"):
        _build_directly(SAM21_TINY, pred_obj_scores=False)


def test_correction_clicks_need_points():
    model = _build_directly(SAM21_TINY).eval()
    backbone_out = model.forward_image(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    _, feats, pos, sizes = model._prepare_backbone_features(backbone_out)
    with pytest.raises(ValueError, match="point_inputs"):
        model.track_step(0, True, feats, pos, sizes, None, None, {}, 1, prev_sam_mask_logits=torch.zeros(1, 1, 32, 32))
