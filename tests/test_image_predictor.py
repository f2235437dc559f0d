"""SAM2ImagePredictor: the same masks, IoU predictions and low-res logits as the official predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sam2.sam2_image_predictor import SAM2ImagePredictor
from tests.predictor_setup import (
    IMAGE_SIZE,
    PERTURB_SNIPPET,
    build_tiny_model,
    snippet,
    tiny_model_config,
)
from tests.reference import assert_close

# (name, set_image target, predict kwargs); "low_res_of:<name>" feeds that case's best low-res
# logits back as mask_input.
CASES = [
    ("one_click", "numpy", {"point_coords": [[30.0, 20.0]], "point_labels": [1]}),
    (
        "two_clicks_single",
        "numpy",
        {
            "point_coords": [[30.0, 20.0], [5.0, 40.0]],
            "point_labels": [1, 0],
            "multimask_output": False,
        },
    ),
    ("box", "numpy", {"box": [10.0, 8.0, 60.0, 40.0], "multimask_output": False}),
    (
        "box_and_click_logits",
        "numpy",
        {
            "box": [10.0, 8.0, 60.0, 40.0],
            "point_coords": [[33.0, 25.0]],
            "point_labels": [1],
            "return_logits": True,
        },
    ),
    (
        "relative_coords",
        "numpy",
        {"point_coords": [[0.25, 0.5]], "point_labels": [1], "normalize_coords": False},
    ),
    (
        "mask_and_click",
        "numpy",
        {
            "point_coords": [[30.0, 20.0]],
            "point_labels": [1],
            "mask_input": "low_res_of:one_click",
            "multimask_output": False,
        },
    ),
    (
        "mask_only",
        "numpy",
        {"mask_input": "low_res_of:one_click", "multimask_output": True},
    ),
    (
        "two_objects_clicks",
        "pil",
        {"point_coords": [[[10.0, 10.0]], [[40.0, 50.0]]], "point_labels": [[1], [1]]},
    ),
    (
        "two_objects_boxes",
        "pil",
        {
            "box": [[0.0, 0.0, 30.0, 30.0], [20.0, 25.0, 44.0, 70.0]],
            "multimask_output": False,
        },
    ),
]
BATCH_PROMPTS = {
    "point_coords_batch": [
        np.array([[30.0, 20.0]]),
        np.array([[12.0, 60.0], [30.0, 30.0]]),
    ],
    "point_labels_batch": [np.array([1]), np.array([1, 0])],
    "box_batch": [np.array([10.0, 8.0, 60.0, 40.0]), None],
}


def _images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # smooth-ish images so the encoder sees structure, not only noise
    first = np.kron(rng.integers(0, 256, (6, 9, 3)), np.ones((8, 8, 1)))[:45, :70].astype(np.uint8)
    second = rng.integers(0, 256, (80, 48, 3), dtype=np.uint8)
    return first, second


def _run_cases(predictor, first: np.ndarray, second: np.ndarray) -> dict:
    """Every case on our predictor or the reference one; the same code runs on both sides."""
    results = {}
    for name, target, kwargs in CASES:
        predictor.set_image(first if target == "numpy" else Image.fromarray(second))
        kwargs = dict(kwargs)
        if isinstance(kwargs.get("mask_input"), str):
            _, ious, low_res = results[kwargs["mask_input"].split(":")[1]]
            kwargs["mask_input"] = low_res[int(np.argmax(ious))][None]
        results[name] = predictor.predict(**kwargs)
    results["embedding"] = predictor.get_image_embedding()
    predictor.set_image_batch([first, second])
    results["batch"] = predictor.predict_batch(**BATCH_PROMPTS)
    results["batch_single"] = predictor.predict_batch(**BATCH_PROMPTS, multimask_output=False, return_logits=True)
    results["batch_embedding"] = predictor.get_image_embedding()
    return results


@pytest.fixture(scope="module")
def reference_run(reference):
    first, second = _images()
    code = snippet(
        """
        import numpy as np
        from PIL import Image
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        from sam2.sam2_image_predictor import SAM2ImagePredictor
        torch.manual_seed(0)
        model = instantiate(OmegaConf.create(inputs["config"]), _recursive_=True).eval()
        """,
        PERTURB_SNIPPET,
        """
        outputs["state_dict"] = model.state_dict()
        predictor = SAM2ImagePredictor(model)
        side = inputs["image_size"] // 16
        # the official predictor hard-codes the feature sizes of a 1024 px model
        predictor._bb_feat_sizes = [(side * 4, side * 4), (side * 2, side * 2), (side, side)]
        CASES, BATCH_PROMPTS = inputs["cases"], inputs["batch_prompts"]
        """,
        _run_cases,
        'outputs["results"] = _run_cases(predictor, inputs["first"], inputs["second"])',
    )
    return reference.run(
        code,
        config=tiny_model_config(),
        image_size=IMAGE_SIZE,
        cases=CASES,
        batch_prompts=BATCH_PROMPTS,
        first=first,
        second=second,
    )


@pytest.fixture(scope="module")
def our_predictor(reference_run):
    return SAM2ImagePredictor(build_tiny_model(tiny_model_config(), reference_run["state_dict"]))


def _to_tensors(value):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (list, tuple)):
        return [_to_tensors(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    return value


@pytest.mark.reference
def test_image_predictor_matches_reference(reference_run, our_predictor):
    first, second = _images()
    ours = _to_tensors(_run_cases(our_predictor, first, second))
    ref = _to_tensors(reference_run["results"])
    for name in ref:
        assert_close(ours[name], ref[name], path=name)


@pytest.mark.reference
def test_reference_outputs_are_not_degenerate(reference_run):
    """Guards the parity test: binary masks must mix foreground and background, and the cases
    must not all give the same answer."""
    results = reference_run["results"]
    masks = results["one_click"][0]
    assert masks.shape == (3, 45, 70) and 0.02 < masks.mean() < 0.98
    assert results["two_objects_clicks"][0].shape == (2, 3, 80, 48)
    assert results["two_objects_boxes"][0].shape == (2, 1, 80, 48)
    assert not np.allclose(results["mask_and_click"][2], results["two_clicks_single"][2])
    assert results["box_and_click_logits"][0].min() < -0.1 < 0.1 < results["box_and_click_logits"][0].max()


def test_predict_before_set_image_says_what_to_call(our_predictor):
    our_predictor.reset_predictor()
    with pytest.raises(RuntimeError, match="set_image"):
        our_predictor.predict(point_coords=[[1.0, 1.0]], point_labels=[1])
    with pytest.raises(RuntimeError, match="set_image"):
        our_predictor.get_image_embedding()
    our_predictor.set_image(np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="point_labels"):
        our_predictor.predict(point_coords=[[1.0, 1.0]])
    with pytest.raises(RuntimeError, match="set_image_batch"):
        our_predictor.predict_batch(point_coords_batch=[[[1.0, 1.0]]], point_labels_batch=[[1]])


def test_hole_filling_in_predictor_changes_only_small_regions(reference_run):
    model = build_tiny_model(tiny_model_config(), reference_run["state_dict"])
    plain, cleaned = (
        SAM2ImagePredictor(model),
        SAM2ImagePredictor(model, max_hole_area=1e6, max_sprinkle_area=0),
    )
    first, _ = _images()
    plain.set_image(first)
    cleaned.set_image(first)
    masks_plain, _, _ = plain.predict(point_coords=[[30.0, 20.0]], point_labels=[1], multimask_output=False)
    masks_filled, _, _ = cleaned.predict(point_coords=[[30.0, 20.0]], point_labels=[1], multimask_output=False)
    # every background region is "small" at this limit: everything becomes foreground
    assert masks_plain.mean() < 1.0 and masks_filled.mean() == 1.0


def test_from_pretrained_refuses_hub_ids():
    with pytest.raises(ValueError, match="local"):
        SAM2ImagePredictor.from_pretrained("facebook/sam2.1-hiera-tiny")
