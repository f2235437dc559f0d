"""SAM2VideoPredictor: the official predictor's masks through a whole interactive session.

The session (`_session`) runs unchanged on both sides: clicks and a box on two frames for two
objects, forward propagation, a correction click on a tracked frame, partial and reverse
propagation, a third object from a mask, clearing prompts and removing an object.

The official predictor stores memories in bfloat16, which on CPU only runs under autocast; for
the float32 comparison its storage dtype is switched to float32 in the reference process (ours
stores in the model's precision outside autocast). A second comparison runs both under bfloat16
autocast, the official default storage included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sam2.video.session import InferenceState
from tests.predictor_setup import (
    PERTURB_SNIPPET,
    build_tiny_model,
    snippet,
    tiny_model_config,
)
from tests.reference import assert_close

pytestmark = pytest.mark.reference

NUM_FRAMES, HEIGHT, WIDTH = 6, 48, 56
VIDEO_CONFIG = tiny_model_config(
    "sam2.sam2_video_predictor.SAM2VideoPredictor",
    # the official video builder's post-processing, except hole filling (its CUDA extension is
    # absent on CPU); ours is tested in test_misc.py
    fill_hole_area=0,
    binarize_mask_from_pts_for_mem_enc=True,
    # off for the logit comparison: its per-pixel argmax jumps by ~10 wherever two objects tie
    # to float32 rounding; tested on its own below
    non_overlap_masks=False,
    sam_mask_decoder_extra_args={
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    },
)


def _write_frames(folder) -> None:
    """A bright rectangle moving right over a smooth background, as JPEG frames."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    background = np.kron(rng.integers(0, 200, (6, 7, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    for t in range(NUM_FRAMES):
        frame = background.copy()
        frame[10:30, 5 + 4 * t : 25 + 4 * t] = (250, 240, 30)
        Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=95)


def _session(predictor, video):
    """The interactive session; returns every output the predictor gave, by step."""
    results = {}
    state = predictor.init_state(video)
    results["click"] = predictor.add_new_points_or_box(state, 0, 1, points=[[15, 20], [45, 40]], labels=[1, 0])
    results["click_more"] = predictor.add_new_points_or_box(
        state, 0, 1, points=[[20, 12]], labels=[1], clear_old_points=False
    )
    results["box"] = predictor.add_new_points_or_box(state, 2, 7, box=[10, 8, 40, 32])
    results["forward"] = list(predictor.propagate_in_video(state))
    results["correction"] = predictor.add_new_points_or_box(
        state, 4, 1, points=[[30, 20]], labels=[0], clear_old_points=False
    )
    results["partial"] = list(predictor.propagate_in_video(state, start_frame_idx=3, max_frame_num_to_track=2))
    results["reverse"] = list(predictor.propagate_in_video(state, start_frame_idx=5, reverse=True))
    mask = np.zeros((48, 56), dtype=bool)
    mask[30:44, 30:50] = True
    results["mask"] = predictor.add_new_mask(state, 1, 9, mask)
    results["with_mask"] = list(predictor.propagate_in_video(state))
    results["cleared"] = predictor.clear_all_prompts_in_frame(state, 4, 1)
    results["removed"] = predictor.remove_object(state, 7)
    results["after_remove"] = list(predictor.propagate_in_video(state, start_frame_idx=1, max_frame_num_to_track=3))
    return results


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video") / "frames"
    _write_frames(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference_run(reference, video_dir):
    code = snippet(
        """
        import numpy as np
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        import sam2.sam2_video_predictor as video_module
        torch.manual_seed(0)
        model = instantiate(OmegaConf.create(inputs["config"]), _recursive_=True).eval()
        """,
        PERTURB_SNIPPET,
        """
        outputs["state_dict"] = model.state_dict()

        class _Float32Storage:
            # the module's view of torch, with its bfloat16 memory storage turned into float32
            def __getattr__(self, name):
                return torch.float32 if name == "bfloat16" else getattr(torch, name)

        video_module.torch = _Float32Storage()
        """,
        _session,
        """
        outputs["float32"] = _session(model, inputs["video"])
        video_module.torch = torch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs["autocast"] = _session(model, inputs["video"])
        """,
    )
    return reference.run(code, config=VIDEO_CONFIG, video=video_dir)


@pytest.fixture(scope="module")
def our_model(reference_run):
    return build_tiny_model(VIDEO_CONFIG, reference_run["state_dict"])


def _masks_by_step(results):
    """(step name, frame index, masks [N, 1, H, W]) for every mask output of a session."""
    for step, value in results.items():
        if step == "removed":
            for frame_idx, masks in value[1]:
                yield step, frame_idx, masks
        elif isinstance(value, list):
            for frame_idx, _, masks in value:
                yield step, frame_idx, masks
        else:
            yield step, value[0], value[2]


@pytest.fixture(scope="module")
def our_float32_run(our_model, video_dir):
    return _session(our_model, video_dir)


def test_float32_session_matches_reference(reference_run, our_float32_run):
    assert_close(our_float32_run, reference_run["float32"])


def test_reference_session_is_not_degenerate(reference_run):
    """Guards the comparisons: tracked frames must show real, changing masks for every object."""
    forward = reference_run["float32"]["forward"]
    assert [frame_idx for frame_idx, _, _ in forward] == list(range(NUM_FRAMES))
    assert forward[0][1] == [1, 7]
    for _, _, masks in forward[1:]:
        foreground = (masks > 0).float().mean(dim=(1, 2, 3))
        assert ((foreground > 0.01) & (foreground < 0.9)).all(), foreground
    assert not torch.equal(forward[1][2], forward[3][2])
    reverse = reference_run["float32"]["reverse"]
    assert [frame_idx for frame_idx, _, _ in reverse] == [5, 4, 3, 2, 1, 0]
    assert reference_run["float32"]["removed"][0] == [1, 9]


def test_bfloat16_autocast_session_matches_reference(reference_run, our_model, video_dir):
    """Under autocast both store memories in bfloat16 and compute matmuls in it: the binary masks
    agree up to a few pixels where bfloat16 rounding moves a logit across 0."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _session(our_model, video_dir)
    ref = reference_run["autocast"]
    for (step, frame_idx, our_masks), (_, ref_frame_idx, ref_masks) in zip(
        _masks_by_step(ours), _masks_by_step(ref), strict=True
    ):
        assert frame_idx == ref_frame_idx
        differing = ((our_masks > 0) != (ref_masks > 0)).sum().item()
        assert differing <= 5, f"{step} frame {frame_idx}: {differing} pixels differ"


def test_in_memory_frames_give_the_folder_results(our_model, video_dir):
    frames = [np.asarray(Image.open(f"{video_dir}/{t:05d}.jpg").convert("RGB")) for t in range(NUM_FRAMES)]
    from_folder = our_model.init_state(video_dir)
    from_memory = our_model.init_state(frames)
    for state in (from_folder, from_memory):
        our_model.add_new_points_or_box(state, 0, 1, points=[[15, 20]], labels=[1])
    assert_close(
        list(our_model.propagate_in_video(from_memory)),
        list(our_model.propagate_in_video(from_folder)),
    )


def test_state_offers_official_keys_and_offloading(our_model, video_dir):
    state = our_model.init_state(video_dir, offload_video_to_cpu=True, offload_state_to_cpu=True)
    assert isinstance(state, InferenceState)
    our_model.add_new_points_or_box(state, 1, "car", points=[[15, 20]], labels=[1])
    assert state["num_frames"] == NUM_FRAMES and (
        state["video_height"],
        state["video_width"],
    ) == (HEIGHT, WIDTH)
    assert state["obj_id_to_idx"] == {"car": 0} and state["obj_ids"] == ["car"]
    assert 1 in state["temp_output_dict_per_obj"][0]["cond_frame_outputs"]
    list(our_model.propagate_in_video(state, max_frame_num_to_track=1))
    stored = state["output_dict_per_obj"][0]["non_cond_frame_outputs"][2]
    assert stored["pred_masks"].device.type == "cpu" and stored["maskmem_features"].dtype == torch.float32


def test_user_errors_say_what_to_do(our_model, video_dir):
    state = our_model.init_state(video_dir)
    with pytest.raises(RuntimeError, match="add_new_points_or_box"):
        list(our_model.propagate_in_video(state))
    with pytest.raises(ValueError, match="together"):
        our_model.add_new_points_or_box(state, 0, 1, points=[[1, 1]])
    with pytest.raises(ValueError, match="clear_old_points=True"):
        our_model.add_new_points_or_box(state, 0, 1, box=[0, 0, 5, 5], clear_old_points=False)
    with pytest.raises(RuntimeError, match="not in the session"):
        our_model.remove_object(state, 42, strict=True)


def test_fill_hole_area_fills_small_holes_in_tracked_masks(reference_run, video_dir):
    config = dict(VIDEO_CONFIG, fill_hole_area=10_000)
    model = build_tiny_model(config, reference_run["state_dict"])
    state = model.init_state(video_dir)
    model.add_new_points_or_box(state, 0, 1, points=[[15, 20]], labels=[1])
    for _, _, masks in model.propagate_in_video(state, max_frame_num_to_track=2):
        # with any background region counting as a hole, low-res masks become all foreground
        assert (masks > 0).all()


def test_non_overlap_masks_leave_at_most_one_object_per_pixel(reference_run, our_float32_run, video_dir):
    model = build_tiny_model(dict(VIDEO_CONFIG, non_overlap_masks=True), reference_run["state_dict"])
    constrained = _session(model, video_dir)
    overlaps_before = 0
    pairs = zip(_masks_by_step(constrained), _masks_by_step(our_float32_run), strict=True)
    for (step, frame_idx, masks), (_, _, plain_masks) in pairs:
        assert ((masks > 0).sum(dim=0) <= 1).all(), f"{step} frame {frame_idx}"
        overlaps_before += int(((plain_masks > 0).sum(dim=0) > 1).sum())
    assert overlaps_before > 0  # the constraint had something to do


def _track_then_correct(model, video_dir):
    state = model.init_state(video_dir)
    model.add_new_points_or_box(state, 0, 1, points=[[15, 20]], labels=[1])
    list(model.propagate_in_video(state))
    model.add_new_points_or_box(state, 3, 1, points=[[30, 20]], labels=[0], clear_old_points=False)
    model.propagate_in_video_preflight(state)
    return state.objects[0]


def test_corrections_become_conditioning_frames_when_asked(reference_run, video_dir):
    model = build_tiny_model(VIDEO_CONFIG, reference_run["state_dict"])
    obj = _track_then_correct(model, video_dir)
    assert sorted(obj.outputs["cond_frame_outputs"]) == [0] and 3 in obj.outputs["non_cond_frame_outputs"]
    model.add_all_frames_to_correct_as_cond = True
    obj = _track_then_correct(model, video_dir)
    assert sorted(obj.outputs["cond_frame_outputs"]) == [0, 3] and 3 not in obj.outputs["non_cond_frame_outputs"]


def test_clearing_memory_around_a_correction_keeps_the_correction(reference_run, video_dir):
    model = build_tiny_model(dict(VIDEO_CONFIG, clear_non_cond_mem_around_input=True), reference_run["state_dict"])
    model.num_maskmem = 1  # reach of one frame on each side
    obj = _track_then_correct(model, video_dir)
    assert sorted(obj.outputs["non_cond_frame_outputs"]) == [1, 3, 5]
    assert obj.outputs["non_cond_frame_outputs"][3]["maskmem_features"] is not None


def test_reset_state_and_frame_range(our_model, video_dir):
    state = our_model.init_state(video_dir, async_loading_frames=True)
    with pytest.raises(IndexError, match="0..5"):
        our_model.add_new_points_or_box(state, NUM_FRAMES, 1, points=[[1, 1]], labels=[1])
    our_model.add_new_points_or_box(state, 0, 1, points=[[15, 20]], labels=[1])
    our_model.reset_state(state)
    assert state.obj_ids == [] and state["output_dict_per_obj"] == {}
    with pytest.raises(RuntimeError, match="no object"):
        list(our_model.propagate_in_video(state))


def test_vos_predictor_compiles_components_but_keeps_checkpoint_keys(reference_run):
    from sam2.sam2_video_predictor import SAM2VideoPredictorVOS

    config = dict(VIDEO_CONFIG, _target_="sam2.sam2_video_predictor.SAM2VideoPredictorVOS")
    model = build_tiny_model(config, reference_run["state_dict"])  # strict load: same keys
    assert isinstance(model, SAM2VideoPredictorVOS)
    for name in ("memory_encoder", "memory_attention", "sam_prompt_encoder", "sam_mask_decoder"):
        assert "forward" in vars(getattr(model, name)), f"{name}.forward was not compiled"
    assert "forward" not in vars(build_tiny_model(VIDEO_CONFIG, reference_run["state_dict"]).memory_attention)
