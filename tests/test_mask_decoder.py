from __future__ import annotations

import inspect

import pytest
import torch

from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from tests.reference import assert_close

DIM, HEADS, GRID, BATCH = 32, 2, 16, 4

CONFIGS = {
    "plain": {},
    "full": {
        "use_high_res_features": True,
        "pred_obj_scores": True,
        "pred_obj_scores_mlp": True,
        "dynamic_multimask_via_stability": True,
        "use_multimask_token_for_obj_ptr": True,
        "iou_prediction_use_sigmoid": True,
    },
    "obj_linear_stability": {"pred_obj_scores": True, "dynamic_multimask_via_stability": True},
}
# (multimask_output, repeat_image, training)
CALLS = [(True, True, False), (False, True, False), (True, False, False), (False, False, False), (False, False, True)]


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image_1": torch.randn(1, DIM, GRID, GRID, generator=g),
        "image_b": torch.randn(BATCH, DIM, GRID, GRID, generator=g),
        "image_pe": torch.randn(1, DIM, GRID, GRID, generator=g),
        "sparse": torch.randn(BATCH, 5, DIM, generator=g),
        "dense": torch.randn(BATCH, DIM, GRID, GRID, generator=g),
        "feat_s0": torch.randn(BATCH, DIM // 8, 4 * GRID, 4 * GRID, generator=g),
        "feat_s1": torch.randn(BATCH, DIM // 4, 2 * GRID, 2 * GRID, generator=g),
    }


def _call(decoder, i: dict, multimask: bool, repeat_image: bool, **overrides):
    x = {**i, **overrides}
    return decoder(
        image_embeddings=x["image_1"] if repeat_image else x["image_b"],
        image_pe=x["image_pe"],
        sparse_prompt_embeddings=x["sparse"],
        dense_prompt_embeddings=x["dense"],
        multimask_output=multimask,
        repeat_image=repeat_image,
        high_res_features=[x["feat_s0"], x["feat_s1"]] if decoder.use_high_res_features else None,
    )


def _loss(outputs) -> torch.Tensor:
    masks, iou, tokens, obj = outputs
    return masks.sin().sum() + iou.sum() + tokens.square().sum() + obj.sum()


# The helpers above are sent to the reference process as source, so both sides run the same calls.
_HELPERS = "\n".join(inspect.getsource(f) for f in (_call, _loss))


@pytest.fixture(scope="module")
def ref_out(reference):
    return reference.run(
        _HELPERS
        + f"""
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.transformer import TwoWayTransformer
i = inputs
results = {{}}
for seed, (name, flags) in enumerate({CONFIGS!r}.items()):
    torch.manual_seed(seed)
    dec = MaskDecoder(
        transformer_dim={DIM},
        transformer=TwoWayTransformer(depth=2, embedding_dim={DIM}, num_heads={HEADS}, mlp_dim=64),
        iou_head_hidden_dim=32,
        **flags,
    )
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.1 * torch.randn_like(p))
    dec.eval()
    thresh = None
    if dec.dynamic_multimask_via_stability:
        # A threshold between the 2nd and 3rd stability scores: half the batch keeps token 0's mask.
        masks = dec.predict_masks(i["image_b"], i["image_pe"], i["sparse"], i["dense"], False,
                                  [i["feat_s0"], i["feat_s1"]] if dec.use_high_res_features else None)[0]
        scores = dec._get_stability_scores(masks[:, 0:1]).flatten().sort().values
        thresh = float((scores[1] + scores[2]) / 2)
        dec.dynamic_multimask_stability_thresh = thresh
    calls = []
    for multimask, repeat_image, training in {CALLS!r}:
        dec.train(training)
        calls.append(_call(dec, i, multimask, repeat_image))
    dec.eval()
    grad_inputs = {{k: i[k].clone().requires_grad_() for k in ("image_1", "sparse", "dense", "feat_s0", "feat_s1")}}
    dec.zero_grad()
    _loss(_call(dec, i, True, True, **grad_inputs)).backward()
    grads = {{k: t.grad for k, t in grad_inputs.items()}}
    grads.update({{"param." + n: p.grad for n, p in dec.named_parameters()}})
    results[name] = dict(sd=dec.state_dict(), thresh=thresh, calls=calls, grads=grads)
outputs["results"] = results
""",
        **_inputs(),
    )


pytestmark = pytest.mark.reference


def _ours(name: str, ref: dict) -> MaskDecoder:
    flags = dict(CONFIGS[name])
    if ref["thresh"] is not None:
        flags["dynamic_multimask_stability_thresh"] = ref["thresh"]
    decoder = MaskDecoder(
        transformer_dim=DIM,
        transformer=TwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=HEADS, mlp_dim=64),
        iou_head_hidden_dim=32,
        **flags,
    )
    decoder.load_state_dict(ref["sd"], strict=True)
    return decoder.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("call", range(len(CALLS)))
def test_outputs_match_reference(ref_out, name, call):
    ref = ref_out["results"][name]
    decoder = _ours(name, ref)
    multimask, repeat_image, training = CALLS[call]
    decoder.train(training)
    outputs = _call(decoder, _inputs(), multimask, repeat_image)
    num_masks = 3 if multimask else 1
    num_tokens = 3 if multimask and decoder.use_multimask_token_for_obj_ptr else 1
    assert outputs[0].shape == (BATCH, num_masks, 4 * GRID, 4 * GRID)
    assert outputs[1].shape == (BATCH, num_masks)
    assert outputs[2].shape == (BATCH, num_tokens, DIM)
    assert outputs[3].shape == (BATCH, 1)
    assert_close(outputs, ref["calls"][call])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_reference(ref_out, name):
    ref = ref_out["results"][name]
    decoder = _ours(name, ref)
    i = _inputs()
    grad_inputs = {k: i[k].clone().requires_grad_() for k in ("image_1", "sparse", "dense", "feat_s0", "feat_s1")}
    _loss(_call(decoder, i, True, True, **grad_inputs)).backward()
    grads = {k: t.grad for k, t in grad_inputs.items()}
    grads.update({"param." + n: p.grad for n, p in decoder.named_parameters()})
    assert set(grads) == set(ref["grads"])
    for key, ref_grad in ref["grads"].items():
        if ref_grad is None:  # e.g. high-res features or conv_s0/conv_s1 the decoder does not use itself
            assert grads[key] is None, key
            continue
        # Gradients sum thousands of terms whose rounding depends on the thread count, so the
        # tolerance follows their magnitude. A key bias gets a mathematically zero gradient (softmax
        # ignores a shift shared by all keys): its rounding noise is measured against its weight's.
        peer = ref["grads"][key.replace(".bias", ".weight")] if key.endswith("k_proj.bias") else None
        scale = max(1.0, ref_grad.abs().max().item(), 0.0 if peer is None else peer.abs().max().item())
        assert_close(grads[key], ref_grad, atol=1e-5 * scale, path=key)


def test_dynamic_stability_uses_both_branches(ref_out):
    ref = ref_out["results"]["full"]
    decoder = _ours("full", ref)
    i = _inputs()
    all_masks, all_iou, _, _ = decoder.predict_masks(
        i["image_b"], i["image_pe"], i["sparse"], i["dense"], False, [i["feat_s0"], i["feat_s1"]]
    )
    masks, _, _, _ = _call(decoder, i, multimask=False, repeat_image=False)
    kept_single = [torch.equal(masks[b, 0], all_masks[b, 0]) for b in range(BATCH)]
    assert sorted(kept_single) == [False, False, True, True]
    best = all_iou[:, 1:].argmax(-1) + 1
    for b in range(BATCH):
        if not kept_single[b]:
            assert torch.equal(masks[b, 0], all_masks[b, best[b]])


def test_gradients_reach_every_used_parameter():
    decoder = MaskDecoder(
        transformer_dim=DIM,
        transformer=TwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=HEADS, mlp_dim=64),
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
    )
    i = _inputs()
    outputs = decoder.predict_masks(
        image_embeddings=i["image_1"],
        image_pe=i["image_pe"],
        sparse_prompt_embeddings=i["sparse"],
        dense_prompt_embeddings=i["dense"],
        repeat_image=True,
    )
    _loss(outputs).backward()
    missing = [n for n, p in decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_rejects_mismatched_batches_and_missing_high_res_features():
    decoder = MaskDecoder(
        transformer_dim=DIM,
        transformer=TwoWayTransformer(depth=1, embedding_dim=DIM, num_heads=HEADS, mlp_dim=64),
        use_high_res_features=True,
    )
    i = _inputs()
    with pytest.raises(ValueError, match="repeat_image"):
        decoder(i["image_b"][:2], i["image_pe"], i["sparse"], i["dense"], True, False, [i["feat_s0"], i["feat_s1"]])
    with pytest.raises(ValueError, match="high_res_features"):
        decoder(i["image_1"], i["image_pe"], i["sparse"], i["dense"], True, True)
    with pytest.raises(ValueError, match="batch size 1"):
        decoder(i["image_1"], i["image_b"], i["sparse"], i["dense"], True, True, [i["feat_s0"], i["feat_s1"]])
