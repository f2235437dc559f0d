"""Lean autograd: the same values and gradients to the bit, with fewer tensors kept for backward."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from sam2.modeling import lean_autograd
from sam2.modeling.lean_autograd import rebuilt_in_backward
from sam2.modeling.sam2_utils import MLP

EXACT = {"rtol": 0.0, "atol": 0.0}


def _leaf(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        *shape, generator=torch.Generator().manual_seed(seed)
    ).requires_grad_()


def _weights_like(out: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, out.numel()).view_as(out)


def test_rebuilt_tensor_is_not_kept_and_backward_is_unchanged():
    x, weight = _leaf(6, 8), _leaf(5, 8, seed=1)

    def run(lean: bool):
        pre = x * 2.0
        activated = F.gelu(pre)  # keeps `pre` for backward
        calls = []

        def rebuild():
            calls.append(1)
            return F.gelu(pre)

        with (
            rebuilt_in_backward(activated, rebuild)
            if lean
            else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        ):
            out = F.linear(activated, weight)
        kept = StorageWeakRef(activated.untyped_storage())
        del activated
        gc.collect()
        alive = not kept.expired()
        x.grad = weight.grad = None
        (out * _weights_like(out)).sum().backward()
        return out.detach(), x.grad.clone(), weight.grad.clone(), alive, len(calls)

    out_plain, gx_plain, gw_plain, alive_plain, _ = run(lean=False)
    out_lean, gx_lean, gw_lean, alive_lean, rebuilds = run(lean=True)
    assert (
        alive_plain and not alive_lean
    )  # the linear layer no longer holds the activation
    assert rebuilds == 1
    torch.testing.assert_close(out_lean, out_plain, **EXACT)
    torch.testing.assert_close(gx_lean, gx_plain, **EXACT)
    torch.testing.assert_close(gw_lean, gw_plain, **EXACT)


def test_views_of_the_tensor_are_rebuilt_with_their_own_layout():
    x = _leaf(4, 3, 5)

    def grad(lean: bool) -> torch.Tensor:
        x.grad = None
        base = x.exp()
        with (
            rebuilt_in_backward(base, lambda: x.detach().exp())
            if lean
            else contextlib.nullcontext()
        ):
            # The product saves a transposed, offset view of `base` for the other factor's gradient.
            out = base.transpose(1, 2)[:, 1:] * x.transpose(1, 2)[:, 1:]
        (out * _weights_like(out)).sum().backward()
        return x.grad.clone()

    torch.testing.assert_close(grad(lean=True), grad(lean=False), **EXACT)


def test_it_is_a_no_op_without_autograd_or_for_a_view():
    x = _leaf(4, 4)
    with torch.no_grad():
        with rebuilt_in_backward(
            x * 2, lambda: pytest.fail("rebuilt without autograd")
        ):
            pass
    view = (x * 2)[1:]
    with rebuilt_in_backward(
        view,
        lambda: pytest.fail("a view that does not start its storage is not rebuilt"),
    ):
        out = (view * x[1:]).sum()
    out.backward()


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_dropout_draws_and_differentiates_like_torch(p, layout):
    x = _leaf(3, 64, 40)
    source = x if layout == "contiguous" else x.transpose(1, 2)
    torch.manual_seed(3)
    expected = F.dropout(source, p, training=True)
    (expected * _weights_like(expected)).sum().backward()
    expected_grad, x.grad = x.grad.clone(), None

    torch.manual_seed(3)
    out, rebuild = lean_autograd.dropout(source, p, training=True)
    (out * _weights_like(out)).sum().backward()
    torch.testing.assert_close(out, expected, **EXACT)
    torch.testing.assert_close(x.grad, expected_grad, **EXACT)
    torch.testing.assert_close(rebuild(), out.detach(), **EXACT)
    after_lean = torch.rand(8)
    torch.manual_seed(3)
    F.dropout(source, p, training=True)
    torch.testing.assert_close(
        after_lean, torch.rand(8), **EXACT
    )  # the same number of draws


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_fused_dropout_rebuilds_its_output_bit_for_bit(p):
    """The CUDA branch's bookkeeping, run with the CPU's `native_dropout` in float32. (In bfloat16
    the CPU kernel rounds the scaled mask to bfloat16 first, which CUDA's does not; the CUDA test
    below checks the real kernels.)"""
    x = torch.randn(4, 300).relu().requires_grad_()
    out, rebuild = lean_autograd.fused_dropout(x, p)
    assert torch.equal(rebuild(), out)
    assert torch.equal(out == 0, (x == 0) | (out.detach() == 0))  # kept entries are scaled, not zeroed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_on_cuda_draws_like_torch_and_rebuilds_bit_for_bit(p, dtype):
    x = torch.randn(3, 64, 40, device="cuda", dtype=dtype).relu().requires_grad_()
    weights = torch.randn(3, 64, 40, device="cuda", dtype=dtype)
    torch.manual_seed(3)
    expected = F.dropout(x, p, training=True)
    (expected * weights).sum().backward()
    expected_grad, x.grad = x.grad.clone(), None
    torch.manual_seed(3)
    out, rebuild = lean_autograd.dropout(x, p, training=True)
    (out * weights).sum().backward()
    assert torch.equal(out, expected) and torch.equal(x.grad, expected_grad)
    assert torch.equal(rebuild(), out.detach())


def test_dropout_is_plain_torch_where_there_is_no_mask_to_keep():
    x = _leaf(8, 8)
    out, rebuild = lean_autograd.dropout(x, 0.1, training=False)
    assert out is x and rebuild is None
    assert lean_autograd.dropout(x, 0.0, training=True)[1] is None
    assert lean_autograd.dropout(x.detach(), 0.1, training=True)[1] is None
    with torch.no_grad():
        assert lean_autograd.dropout(x, 0.1, training=True)[1] is None


@pytest.mark.parametrize("activation", [torch.nn.GELU, torch.nn.ReLU])
def test_mlp_values_and_gradients_are_the_plain_composition(activation):
    torch.manual_seed(0)
    mlp = MLP(8, 32, 4, num_layers=3, activation=activation)
    x = _leaf(2, 5, 8)
    out = mlp(x)
    (out * _weights_like(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in mlp.named_parameters()}
    input_grad, x.grad = x.grad.clone(), None
    mlp.zero_grad(set_to_none=True)

    act = activation()
    plain = F.linear(
        act(F.linear(act(F.linear(x, *_wb(mlp, 0))), *_wb(mlp, 1))), *_wb(mlp, 2)
    )
    (plain * _weights_like(plain)).sum().backward()
    torch.testing.assert_close(out, plain, **EXACT)
    torch.testing.assert_close(input_grad, x.grad, **EXACT)
    for name, param in mlp.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, msg=name, **EXACT)


def _wb(mlp: MLP, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return mlp.layers[index].weight, mlp.layers[index].bias


def test_mlp_does_not_keep_a_gelu_output_for_backward():
    mlp = MLP(8, 32, 4, num_layers=2, activation=torch.nn.GELU)
    outputs = []
    mlp.act.register_forward_hook(
        lambda module, args, out: outputs.append(StorageWeakRef(out.untyped_storage()))
    )
    loss = mlp(_leaf(5, 8)).sum()
    gc.collect()
    assert outputs and outputs[0].expired()
    loss.backward()


@pytest.mark.parametrize("autocast", [False, True])
def test_cxblock_rebuilds_its_gelu_output_with_unchanged_outputs_and_gradients(monkeypatch, autocast):
    from sam2.modeling import memory_encoder

    torch.manual_seed(0)
    block = memory_encoder.CXBlock(16, layer_scale_init_value=0.5)
    x = _leaf(2, 16, 6, 6)
    outputs = []
    block.act.register_forward_hook(lambda module, args, out: outputs.append(StorageWeakRef(out.untyped_storage())))

    def run():
        outputs.clear()
        x.grad = None
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = block(x)
        gc.collect()
        kept = not outputs[0].expired()
        (out.float() * _weights_like(out)).sum().backward()
        return kept, out.detach(), [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]

    kept, lean_out, lean_grads = run()
    assert not kept
    monkeypatch.setattr(memory_encoder, "rebuilt_activation", lambda *args: contextlib.nullcontext())
    kept, plain_out, plain_grads = run()
    assert kept
    torch.testing.assert_close(lean_out, plain_out, **EXACT)
    for lean, plain in zip(lean_grads, plain_grads):
        torch.testing.assert_close(lean, plain, **EXACT)


def test_contexts_nest_and_each_rebuilds_its_own_tensor():
    x = _leaf(6, 8)
    kept = {}

    def run(lean: bool):
        x.grad = None
        pre = x * 2.0
        first = F.gelu(pre)  # the GELU keeps `pre`, from which both rebuilds start
        outer = rebuilt_in_backward(first, lambda: F.gelu(pre)) if lean else contextlib.nullcontext()
        with outer:
            second = F.gelu(first)  # would keep `first`
            inner = rebuilt_in_backward(second, lambda: F.gelu(F.gelu(pre))) if lean else contextlib.nullcontext()
            with inner:
                out = second * x  # would keep `second`, and keeps `x` through both contexts
        refs = [StorageWeakRef(t.untyped_storage()) for t in (first, second)]
        del first, second
        gc.collect()
        kept[lean] = [not ref.expired() for ref in refs]
        (out * _weights_like(out)).sum().backward()
        return out.detach(), x.grad.clone()

    plain, lean = run(lean=False), run(lean=True)
    assert kept == {False: [True, True], True: [False, False]}
    torch.testing.assert_close(lean[0], plain[0], **EXACT)
    torch.testing.assert_close(lean[1], plain[1], **EXACT)


def test_other_saved_tensor_hooks_keep_control():
    """Under activation checkpointing's (or any other) hooks, nothing is swapped for a recipe."""
    x = _leaf(4, 4)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: seen.append(t) or t, lambda t: t
    ):
        activated = x.exp()
        with rebuilt_in_backward(
            activated, lambda: pytest.fail("rebuilt under foreign hooks")
        ):
            out = (activated * x).sum()
    assert any(t is activated for t in seen)
    out.backward()



def test_meta_tensors_are_told_apart_and_hiera_traces_on_meta():
    """Meta tensors have no addresses (every one reads as 0); matched by address, a rebuild would
    stand in for any saved tensor. Shape-only runs on the meta device (FLOP counting, memory
    planning) go through forward and backward."""
    from sam2.modeling.backbones import hieradet
    from tests.test_hiera import TINY

    x = torch.empty(4, 4, device="meta", requires_grad=True)
    weight = torch.empty(4, 4, device="meta", requires_grad=True)
    with rebuilt_in_backward(x * 2, lambda: pytest.fail("another meta tensor was rebuilt")):
        out = (x * 2) @ weight
    out.sum().backward()
    doubled = x * 2
    rebuilt = []
    with rebuilt_in_backward(doubled, lambda: rebuilt.append(True) or x * 2):
        out = doubled @ weight
    out.sum().backward()
    assert rebuilt == [True] and weight.grad.shape == (4, 4)
    trunk = hieradet.Hiera(**TINY).train().to("meta")
    features = trunk(torch.empty(2, 3, 96, 96, device="meta", requires_grad=True))
    sum(f.sum() for f in features).backward()
    assert [tuple(f.shape[2:]) for f in features] == [(24, 24), (12, 12), (6, 6), (3, 3)]
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in trunk.parameters())


def widen_norms_as_cuda_autocast_does(monkeypatch) -> None:
    """CPU autocast runs LayerNorm in the input's dtype; CUDA autocast in float32 (a cast-up copy)."""
    monkeypatch.setattr(lean_autograd, "_norm_widens", lambda *setting: True)


# backward runs without autocast: rebuilds must not care
@pytest.mark.parametrize("autocast", ["off", "cpu", "widening_norms"])
@pytest.mark.parametrize("size", [64, 96])  # 96 px pads windows and crops pooled ones
def test_hiera_rebuilds_change_no_output_or_gradient(monkeypatch, size, autocast):
    from sam2.modeling.backbones import hieradet
    from tests.test_hiera import TINY

    if autocast == "widening_norms":
        widen_norms_as_cuda_autocast_does(monkeypatch)
    torch.manual_seed(0)
    trunk = hieradet.Hiera(**TINY, drop_path_rate=0.2).train()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))

    def run():
        trunk.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # drop-path draws
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast != "off"):
            features = trunk(images)
        sum((f.float() * _weights_like(f)).sum() for f in features).backward()
        return [f.detach() for f in features], {n: p.grad.clone() for n, p in trunk.named_parameters()}

    lean_features, lean_grads = run()
    for module in (hieradet, lean_autograd):
        monkeypatch.setattr(module, "rebuilt_in_backward", lambda tensor, rebuild: contextlib.nullcontext())
    plain_features, plain_grads = run()
    torch.testing.assert_close(lean_features, plain_features, **EXACT)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, msg=name, **EXACT)


def test_hiera_under_autocast_keeps_no_low_precision_copy_of_its_norms(monkeypatch):
    """Under autocast the linear layers would keep the bf16 copies of the norm outputs they read;
    the block casts them itself and rebuilds them in backward, with the values autocast gives."""
    from sam2.modeling.backbones import hieradet
    from tests.test_hiera import TINY

    torch.manual_seed(0)
    trunk = hieradet.Hiera(**TINY).train()
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    copies = []
    norm_for_matmuls = hieradet._norm_for_matmuls

    def recording(norm, x):
        normed, rebuild = norm_for_matmuls(norm, x)
        copies.append((normed.dtype, StorageWeakRef(normed.untyped_storage())))
        return normed, rebuild

    def run():
        trunk.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = trunk(images)
        gc.collect()
        kept = [not ref.expired() for _, ref in copies]
        sum((f.float() * _weights_like(f)).sum() for f in features).backward()
        return kept, [f.detach() for f in features], {n: p.grad.clone() for n, p in trunk.named_parameters()}

    monkeypatch.setattr(hieradet, "_norm_for_matmuls", recording)
    kept, features, grads = run()
    assert copies and all(dtype == torch.bfloat16 for dtype, _ in copies)
    assert not any(kept)
    # Leaving the cast to autocast gives the same values and gradients to the bit.
    monkeypatch.setattr(hieradet, "autocast_matmul_dtype", lambda x: None)
    _, plain_features, plain_grads = run()
    torch.testing.assert_close(features, plain_features, **EXACT)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name, **EXACT)


def test_a_norm_that_autocast_widens_keeps_only_its_low_precision_input(monkeypatch):
    widen_norms_as_cuda_autocast_does(monkeypatch)
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    weights = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lean_autograd.autocast_widens_norm(x) and not lean_autograd.autocast_widens_norm(x.float())
        normed, rebuild = lean_autograd.widened_norm(norm, x)
    assert normed.dtype == torch.float32
    # The norm's saved input is rebuilt from x at each use, not kept.
    first, second = normed.grad_fn._saved_input, normed.grad_fn._saved_input
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert torch.equal(first, x.float())
    assert torch.equal(rebuild(), normed)  # outside autocast, as in backward
    (normed * weights).sum().backward()
    lean_grads = [x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone()]

    x.grad = norm.weight.grad = norm.bias.grad = None
    plain = norm(x.float())
    torch.testing.assert_close(normed, plain, **EXACT)
    (plain * weights).sum().backward()
    for lean, grad in zip(lean_grads, [x.grad, norm.weight.grad, norm.bias.grad]):
        torch.testing.assert_close(lean, grad, **EXACT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.undo()
        assert not lean_autograd.autocast_widens_norm(x)  # CPU autocast runs LayerNorm in bfloat16


def test_autocast_matmul_dtype_follows_autocast():
    x = torch.randn(2, 2)
    assert lean_autograd.autocast_matmul_dtype(x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lean_autograd.autocast_matmul_dtype(x) == torch.bfloat16
        assert lean_autograd.autocast_matmul_dtype(x.bfloat16()) is None
        assert lean_autograd.autocast_matmul_dtype(torch.ones(2, dtype=torch.long)) is None
