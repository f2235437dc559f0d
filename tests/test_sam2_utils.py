import pytest
import torch
import torch.nn.functional as F

from sam2.modeling.sam2_utils import MLP, DropPath, LayerNorm2d, get_activation_fn, resize
from tests.reference import assert_close

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def ref_out(reference):
    return reference.run(
        """
        from sam2.modeling.sam2_utils import MLP, LayerNorm2d
        torch.manual_seed(0)
        mlp = MLP(8, 16, 4, 3, sigmoid_output=True)
        ln = LayerNorm2d(6)
        with torch.no_grad():
            ln.weight.normal_(); ln.bias.normal_()
        outputs["mlp_sd"] = mlp.state_dict()
        outputs["ln_sd"] = ln.state_dict()
        outputs["mlp_y"] = mlp(inputs["x"])
        outputs["ln_y"] = ln(inputs["img"])
        """,
        x=torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)),
        img=torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(2)) * 3 + 1,
    )


def test_mlp_matches_reference(ref_out):
    mlp = MLP(8, 16, 4, 3, sigmoid_output=True)
    mlp.load_state_dict(ref_out["mlp_sd"], strict=True)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    assert_close(mlp(x), ref_out["mlp_y"])


def test_layernorm2d_matches_reference(ref_out):
    ln = LayerNorm2d(6)
    ln.load_state_dict(ref_out["ln_sd"], strict=True)
    img = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(2)) * 3 + 1
    assert_close(ln(img), ref_out["ln_y"])


def test_drop_path_is_identity_in_eval_and_drops_whole_samples_in_train():
    layer = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    assert torch.equal(layer.eval()(x), x)
    y = layer.train()(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="relu"):
        get_activation_fn("swish")


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(64, 48), (5, 9)])  # up and down
def test_resize_is_interpolate_forward_and_its_gradient_backward(mode, size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 12, generator=gen)
    grad = torch.randn(2, 3, *size, generator=gen)
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = resize(ours, size, mode=mode)
    expected = F.interpolate(theirs, size=size, mode=mode, align_corners=False)
    assert torch.equal(out, expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)


def test_resize_builds_its_backward_weights_once_per_size():
    """A second backward of the same resize reuses the cached weights, with the same gradient."""
    from sam2.modeling import sam2_utils

    sam2_utils._cached_resize_matrix.cache_clear()
    x = torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = None
        resize(x, (64, 48), mode="bilinear").sum().backward()
        grads.append(x.grad)
    info = sam2_utils._cached_resize_matrix.cache_info()
    assert (info.misses, info.hits) == (2, 2)  # height and width built once, then reused
    assert torch.equal(grads[0], grads[1])
