"""Hiera trunk: parity with the official code (outputs, gradients, drop-path draws, state-dict layout)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from sam2.modeling.backbones.hieradet import Hiera, MultiScaleAttention, _pool_channels_last
from sam2.modeling.backbones.utils import window_partition, window_unpartition
from sam2.modeling.sam2_utils import DropPath
from tests.reference import assert_close_scaled

# Windowed and global blocks, query pooling at every transition (blocks 1, 3, 6); at 96 px the
# 6x6 stage-3 grid is padded to windows of 4 (block 4), and block 6 pools padded windows whose
# result is cropped back to 3x3.
TINY = dict(
    embed_dim=16,
    num_heads=1,
    stages=[1, 2, 3, 1],
    window_spec=[4, 2, 4, 2],
    global_att_blocks=[2, 5],
    window_pos_embed_bkg_spatial_size=[3, 5],
)
# 96 px pads windows (see TINY); 112 px cuts stage-3 windows to three rows, of which the next
# block's query pooling keeps two.
IMAGE_SIZES = {"square_64": (64, 64), "square_96": (96, 96), "wide_64x96": (64, 96), "odd_112x96": (112, 96)}

FULL_SIZES = {
    "tiny": dict(embed_dim=96, num_heads=1, stages=[1, 2, 7, 2], global_att_blocks=[5, 7, 9],
                 window_pos_embed_bkg_spatial_size=[7, 7]),
    "small": dict(embed_dim=96, num_heads=1, stages=[1, 2, 11, 2], global_att_blocks=[7, 10, 13],
                  window_pos_embed_bkg_spatial_size=[7, 7]),
    "base_plus": dict(embed_dim=112, num_heads=2),
    "large": dict(embed_dim=144, num_heads=2, stages=[2, 6, 36, 4], global_att_blocks=[23, 33, 43],
                  window_pos_embed_bkg_spatial_size=[7, 7], window_spec=[8, 4, 16, 8]),
}


# Parameter names as layer-wise lr decay sees them, inside and outside the trunk.
LAYER_NAMES = [
    "pos_embed", "image_encoder.trunk.pos_embed_window", "patch_embed.proj.bias", "blocks.0.norm1.weight",
    "image_encoder.trunk.blocks.6.mlp.layers.1.weight", "rel_pos_h", "image_encoder.neck.convs.0.conv.weight",
]


def _images() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(2, 3, h, w, generator=gen) for name, (h, w) in IMAGE_SIZES.items()}


def _grad_weights() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(2, 16 * 2**s, 28 // 2**s, 28 // 2**s, generator=gen) for s in range(4)]


def _weighted_sum(features: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """Features weighted by (the top-left corner of) fixed random maps, summed."""
    return sum((f * w[..., : f.shape[-2], : f.shape[-1]]).sum() for f, w in zip(features, weights))


@pytest.fixture(scope="module")
def ref_out(reference):
    return reference.run(
        """
        import torch.nn as nn
        from sam2.modeling.backbones.hieradet import Hiera
        from sam2.modeling.sam2_utils import DropPath
        cfg, images = inputs["cfg"], inputs["images"]

        torch.manual_seed(0)
        net = Hiera(**cfg).eval()
        with torch.no_grad():  # the position embeddings start at zero; give them real values
            for p in net.parameters():
                p.add_(0.2 * torch.randn_like(p))
        outputs["state_dict"] = net.state_dict()
        outputs["channel_list"] = net.channel_list
        outputs["layer_ids"] = {n: net.get_layer_id(n) for n in inputs["layer_names"]}
        with torch.no_grad():
            outputs["features"] = {name: net(img) for name, img in images.items()}
            last_only = Hiera(**cfg, return_interm_layers=False).eval()
            last_only.load_state_dict(net.state_dict())
            outputs["last_only"] = (last_only(images["square_96"]), last_only.channel_list)

        outputs["grads"] = {}
        for name in ("square_64", "square_96", "odd_112x96"):
            img = images[name].clone().requires_grad_(True)
            loss = sum((f * w[..., :f.shape[-2], :f.shape[-1]]).sum() for f, w in zip(net(img), inputs["grad_weights"]))
            loss.backward()
            outputs["grads"][name] = (img.grad, {n: p.grad for n, p in net.named_parameters()})
            net.zero_grad(set_to_none=True)

        dropping = Hiera(**cfg, drop_path_rate=0.5)
        dropping.load_state_dict(net.state_dict())
        outputs["drop_probs"] = [
            b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in dropping.blocks
        ]
        torch.manual_seed(123)
        with torch.no_grad():
            outputs["train_features"] = dropping.train()(images["square_64"])

        # Only names and shapes are needed at full size: skip the costly random init.
        nn.init.kaiming_uniform_ = nn.init.uniform_ = lambda t, *a, **k: t
        outputs["full_layouts"] = {
            name: ([(k, tuple(v.shape), v.dtype) for k, v in Hiera(**kw).state_dict().items()], Hiera(**kw).channel_list)
            for name, kw in inputs["full_sizes"].items()
        }
        """,
        cfg=TINY,
        images=_images(),
        grad_weights=_grad_weights(),
        full_sizes=FULL_SIZES,
        layer_names=LAYER_NAMES,
    )


@pytest.fixture(scope="module")
def tiny(ref_out) -> Hiera:
    net = Hiera(**TINY).eval()
    net.load_state_dict(ref_out["state_dict"], strict=True)
    return net


# Windows cut by the padding attend in up to four batches with queries at real tokens (the CPU
# default), or as one batch with queries at the padding too (the default elsewhere).
attend_padding = pytest.mark.parametrize("attend_padding", [False, True], ids=["real_queries", "padding_queries"])


@pytest.mark.reference
@pytest.mark.parametrize("size", list(IMAGE_SIZES))
@attend_padding
def test_features_match_reference(tiny, ref_out, size, attend_padding, monkeypatch):
    monkeypatch.setattr(MultiScaleAttention, "attend_padding", attend_padding)
    with torch.no_grad():
        features = tiny(_images()[size])
    h, w = IMAGE_SIZES[size]
    assert [tuple(f.shape[2:]) for f in features] == [(h // 4 // 2**s, w // 4 // 2**s) for s in range(4)]
    assert [f.shape[1] for f in features] == tiny.channel_list[::-1] == ref_out["channel_list"][::-1]
    assert_close_scaled(features, ref_out["features"][size])


@pytest.mark.reference
def test_last_layer_only_matches_reference(tiny, ref_out):
    net = Hiera(**TINY, return_interm_layers=False).eval()
    net.load_state_dict(tiny.state_dict(), strict=True)
    ref_features, ref_channels = ref_out["last_only"]
    with torch.no_grad():
        features = net(_images()["square_96"])
    assert net.channel_list == ref_channels == [128]
    assert_close_scaled(features, ref_features)


@pytest.mark.reference
@pytest.mark.parametrize("size", ["square_64", "square_96", "odd_112x96"])
@attend_padding
def test_gradients_match_reference(tiny, ref_out, size, attend_padding, monkeypatch):
    monkeypatch.setattr(MultiScaleAttention, "attend_padding", attend_padding)
    img = _images()[size].requires_grad_(True)
    _weighted_sum(tiny(img), _grad_weights()).backward()
    ref_input_grad, ref_param_grads = ref_out["grads"][size]
    assert_close_scaled(img.grad, ref_input_grad)
    grads = {name: p.grad for name, p in tiny.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert_close_scaled(grads, ref_param_grads)
    tiny.zero_grad(set_to_none=True)


@pytest.mark.reference
def test_drop_path_rises_linearly_and_draws_like_reference(tiny, ref_out):
    net = Hiera(**TINY, drop_path_rate=0.5)
    net.load_state_dict(tiny.state_dict(), strict=True)
    probs = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in net.blocks]
    assert probs == ref_out["drop_probs"]
    assert probs[0] == 0.0 and probs[-1] == 0.5
    img = _images()["square_64"]
    torch.manual_seed(123)
    with torch.no_grad():
        train_features = net.train()(img)
        eval_features = net.eval()(img)
    assert_close_scaled(train_features, ref_out["train_features"])
    assert not torch.allclose(train_features[-1], eval_features[-1])


@pytest.mark.reference
@pytest.mark.parametrize("size", list(FULL_SIZES))
def test_full_size_state_dict_layout_matches_reference(ref_out, size):
    with torch.device("meta"):
        net = Hiera(**FULL_SIZES[size])
    layout = [(k, tuple(v.shape), v.dtype) for k, v in net.state_dict().items()]
    ref_layout, ref_channels = ref_out["full_layouts"][size]
    assert layout == ref_layout
    assert net.channel_list == ref_channels


@pytest.mark.reference
def test_layer_ids_for_lr_decay_match_reference(tiny, ref_out):
    assert tiny.get_num_layers() == 7
    assert {name: tiny.get_layer_id(name) for name in LAYER_NAMES} == ref_out["layer_ids"]


def test_window_round_trip_with_padding():
    x = torch.randn(2, 7, 10, 3)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 4, 4, 3) and padded == (8, 12)
    assert torch.equal(windows[1], x[0, :4, 4:8])
    assert torch.equal(window_unpartition(windows, 4, padded, (7, 10)), x)


def test_pos_embed_tiles_window_from_top_left_when_grid_is_not_a_multiple():
    net = Hiera(**TINY)
    with torch.no_grad():
        net.pos_embed_window.copy_(torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 16, 4, 4))
    pos = net._get_pos_embed((6, 9))
    assert pos.shape == (1, 6, 9, 16)
    assert torch.equal(pos[0, 4:, 8, 0], torch.tensor([0.0, 4.0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(window_spec=[4, 2, 4]), "one window size per stage"),
        (dict(q_pool=4), "q_pool=4"),
        (dict(window_spec=[3, 2, 4, 2]), "divisible by q_stride"),
        (dict(weights_path="hiera.pt"), "load_state_dict"),
    ],
)
def test_bad_configs_are_rejected_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Hiera(**{**TINY, **kwargs})


@pytest.mark.parametrize("hw", [(8, 6), (7, 5)])  # the odd size leaves a row and a column out
def test_window_max_pool_keeps_bool_winners_and_gives_max_pool2d_gradients(hw):
    gen = torch.Generator().manual_seed(0)
    # Few distinct values, so windows hold ties: both must pick the same (first) maximum.
    x = torch.randint(0, 4, (2, *hw, 3), generator=gen).float()
    grad = torch.randn(2, hw[0] // 2, hw[1] // 2, 3, generator=gen)
    pool = torch.nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 2))
    outs = []
    for pool_fn in (partial(_pool_channels_last, pool=pool), lambda t: pool(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)):
        leaf = x.clone().requires_grad_(True)
        out = pool_fn(leaf)
        if not outs:
            assert [t.dtype for t in out.grad_fn.saved_tensors] == [torch.bool] * 4
        out.backward(grad)
        outs.append((out.detach(), leaf.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert (outs[0][1] != 0).sum() == grad.numel()


@pytest.mark.parametrize("hw", [(64, 64), (68, 44), (36, 100), (124, 60)])
def test_both_padded_window_paths_agree_in_float64(hw, monkeypatch):
    """Cut windows of every kind: pooled ones whose last run keeps fewer query rows than it has real
    tokens, or none at all (the run is dropped), and windows cut in one direction only."""
    torch.manual_seed(0)
    net = Hiera(embed_dim=8, num_heads=1, stages=(1, 2, 2, 1), global_att_blocks=(4,),
                window_pos_embed_bkg_spatial_size=(4, 4), window_spec=(4, 6, 6, 2)).double()  # fmt: skip
    results, weights = [], None
    for attend in (True, False):
        monkeypatch.setattr(MultiScaleAttention, "attend_padding", attend)
        net.zero_grad(set_to_none=True)
        image = torch.randn(2, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        image.requires_grad_(True)
        features = net(image)
        weights = weights or [torch.randn(f.shape, dtype=f.dtype) for f in features]
        _weighted_sum(features, weights).backward()
        grads = {name: p.grad for name, p in net.named_parameters()}
        results.append(([f.detach() for f in features], image.grad, grads))
    (features, image_grad, grads), (cut_features, cut_image_grad, cut_grads) = results
    torch.testing.assert_close(cut_features, features, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(cut_image_grad, image_grad, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(cut_grads, grads, rtol=1e-12, atol=1e-13)


@attend_padding
def test_padded_windows_stay_in_autocast_precision(attend_padding, monkeypatch):
    """Under autocast the bias padding takes the projection's dtype: the windows reach attention
    in bfloat16 (a float32 pad would promote the whole map), with the same values as before."""
    from sam2.modeling.backbones import hieradet

    monkeypatch.setattr(MultiScaleAttention, "attend_padding", attend_padding)
    torch.manual_seed(0)
    net = Hiera(**TINY).eval()
    image = _images()["square_96"]  # pads stage-3 windows
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(hieradet.F, "scaled_dot_product_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = net(image)
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen
    if not attend_padding:  # the windows are cut without `window_partition`
        return
    # A float32 pad, as before: the promoted windows are cast back to bfloat16 for attention.
    partition = hieradet.window_partition
    monkeypatch.setattr(
        hieradet,
        "window_partition",
        lambda x, size, pad_value=None: partition(x, size, None if pad_value is None else pad_value.float()),
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        promoted = net(image)
    torch.testing.assert_close(features, promoted, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
@attend_padding
def test_trunk_compiles_without_graph_breaks_and_trains_alike(autocast, attend_padding, monkeypatch):
    """`compile_image_encoder` traces the trunk whole, either padded-window path: no graph break,
    same outputs and gradients."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(MultiScaleAttention, "attend_padding", attend_padding)
    torch.manual_seed(0)
    net = Hiera(**TINY).train()
    images = _images()["square_96"].requires_grad_(True)  # pads windows, pools, crops

    def run(module):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            features = module(images)
        grads = torch.autograd.grad(_weighted_sum([f.float() for f in features], _grad_weights()), [images, *net.parameters()])
        return features, grads

    eager_features, eager_grads = run(net)
    torch._dynamo.reset()
    counters.clear()
    compiled_features, compiled_grads = run(torch.compile(net, backend="eager"))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(compiled_features, eager_features, rtol=0, atol=0)
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=0, atol=0)
