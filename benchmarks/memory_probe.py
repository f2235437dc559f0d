"""Child process for bench_memory.py: what one side keeps for backward in a GPU training step,
measured without a GPU.

The model and loss (`--spec`, resolved Hydra configs) are built by whichever `sam2`/`training`
is first on `PYTHONPATH`, moved to fake CUDA tensors (`torch._subclasses.FakeTensorMode`: shapes
and dtypes, no data) and run forward with the loss under CUDA autocast's rules: bfloat16
matmuls, float32 LayerNorm. Two things a fake device cannot choose are set as a GPU would:
scaled-dot-product attention runs the flash kernel (the fake device would pick the math path,
which keeps the attention matrices), and a tensor value read on the host (the reference loss's
object count) reads 1.

Every storage a dispatched op creates is tracked until its last tensor dies. The record has the
peak of live bytes during the forward, the bytes still live after it (the activations kept for
backward, plus the loss), and the latter split by the top-level module that created them; the
peak during backward (kept activations, gradients and backward's transient buffers), with the
weights' bytes, from which the step's peak follows; and
the number of forward ops a GPU launches kernels for (not views, allocations or `prim` queries):
a proxy for the host's share of a host-bound step. For the device's share, each such op's memory
traffic (the elements its tensor arguments and outputs address, once each) and FLOPs (torch's
flop counter: matmuls, convolutions, attention) are summed, by part, and turned into a roofline
time on an H100 SXM: per op, the longer of its traffic at 3.35 TB/s and its FLOPs at 989 TFLOP/s
(bfloat16 or float16 inputs) or 67 TFLOP/s (float32).

Autograd's engine cannot run a backward on fake CUDA tensors (it needs a real CUDA context), so
`node_by_node_backward` runs the graph from Python in the engine's order, freeing each node's
saved tensors once it has run, as the engine does. The same function on real CPU tensors gives
the engine's gradients (tests/test_benchmarks.py).

    python benchmarks/memory_probe.py --spec spec.json --out record.json
"""

from __future__ import annotations

import collections
import gc
import heapq
import importlib.util
import json
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

# The side-neutral helpers of common.py, loaded by path (this runs with one side's packages first).
_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


# H100 SXM datasheet peaks: HBM3 bandwidth, dense tensor-core bfloat16/float16 and float32 (no TF32).
BYTES_PER_S = 3.35e12
LOW_PRECISION_FLOPS_PER_S = 989e12
FLOAT32_FLOPS_PER_S = 67e12


def addressed_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (an expanded dimension reads once)."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


def device_work(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> tuple[int, int, float]:
    """(bytes read and written, FLOPs, roofline seconds) of one kernel-launching op."""
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    traffic = sum(addressed_bytes(t) for t in inputs + outputs)
    count = flop_registry.get(func._overloadpacket)
    flops = int(count(*args, **kwargs, out_val=out)) if count is not None else 0
    low_precision = any(t.dtype in (torch.bfloat16, torch.float16) for t in inputs)
    peak = LOW_PRECISION_FLOPS_PER_S if low_precision else FLOAT32_FLOPS_PER_S
    return traffic, flops, max(traffic / BYTES_PER_S, flops / peak)


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages that dispatched ops create on `device_type` (here the fake CUDA
    device), by creator."""

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__()
        self.device_type = device_type
        self.parts: list[str] = []  # the top-level parts whose forwards are running, innermost last
        self.refs: collections.Counter = collections.Counter()
        self.size: dict[int, int] = {}
        self.creator: dict[int, str] = {}
        self.live = self.peak = self.ops = 0
        self.work = collections.defaultdict(lambda: [0, 0, 0.0])  # part -> bytes, FLOPs, roofline s
        self.counting_work = True  # the device-work proxy covers the forward only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if common.launches_kernels(func):
            self.ops += 1
            if self.counting_work:
                work = self.work[self.parts[-1] if self.parts else "(outside modules)"]
                for i, amount in enumerate(device_work(func, args, kwargs, out)):
                    work[i] += amount
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == self.device_type:
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.size:
            self.size[key] = storage.nbytes()
            self.creator[key] = self.parts[-1] if self.parts else "(outside modules)"
            self.live += self.size[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.size.pop(key)
            self.creator.pop(key)

    def by_creator(self) -> dict[str, int]:
        totals: collections.Counter = collections.Counter()
        for key, size in self.size.items():
            totals[self.creator[key]] += size
        return dict(totals.most_common())


_SDPA = F.scaled_dot_product_attention


def flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
    """`F.scaled_dot_product_attention` as a GPU runs it for these shapes: the flash kernel."""
    if attn_mask is None and not extra and q.device.type == "cuda" and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if q.dtype in (torch.bfloat16, torch.float16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra)


def node_by_node_backward(holder: list[torch.Tensor]) -> int:
    """`loss.backward()` for the loss in `holder` (which this empties), run from Python one autograd
    node at a time; returns the nodes run.

    As the engine does: a node runs once every node that feeds it a gradient has run, the most
    recently created first (highest sequence number; gradient accumulators at once); a gradient
    is summed to its input's shape (an expanded input) and cast to its dtype; gradients that
    meet at one input add up; undefined gradients reach custom autograd Functions as zeros.
    Nodes are held only from their first incoming gradient until they run, and the caller must
    hold no other tensor of the graph (the loss comes in a list so that no argument holds it), so
    each node, with the tensors it saved, is freed right after it runs.
    """
    loss = holder.pop()
    root = loss.grad_fn
    if root is None:
        raise ValueError("the loss has no autograd graph (nothing in it requires grad)")
    pending: collections.Counter = collections.Counter()  # node key -> gradients still to come
    root.metadata["_key"] = 0
    stack, keys, child = [root], 1, None
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is None:
                continue
            if "_key" not in child.metadata:
                child.metadata["_key"] = keys
                keys += 1
                stack.append(child)
            pending[child.metadata["_key"]] += 1
    nodes, inputs = {0: root}, {0: [torch.ones_like(loss)]}
    ready = [(-root._sequence_nr(), 0)]
    del root, loss, stack, child
    runs = 0
    with torch.no_grad():
        while ready:
            node = nodes.pop(heapq.heappop(ready)[1])
            grads = inputs.pop(node.metadata["_key"])
            if isinstance(node, torch.autograd.function.BackwardCFunction):  # a custom Function's backward
                grads = [
                    torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device) if grad is None else grad
                    for grad, meta in zip(grads, node._input_metadata)
                ]
                outputs = node.apply(*grads)
            else:
                outputs = node(*grads)
            del grads
            runs += 1
            for (child, index), grad in zip(node.next_functions, outputs if isinstance(outputs, tuple) else (outputs,)):
                if child is None:
                    continue
                key = child.metadata["_key"]
                nodes.setdefault(key, child)
                buffer = inputs.setdefault(key, [None] * len(child._input_metadata))
                if grad is not None:
                    meta = child._input_metadata[index]
                    if tuple(grad.shape) != tuple(meta.shape):
                        grad = grad.sum_to_size(meta.shape)
                    if grad.dtype != meta.dtype:
                        grad = grad.to(meta.dtype)
                    buffer[index] = grad if buffer[index] is None else buffer[index] + grad
                pending[key] -= 1
                if pending[key] == 0:
                    heapq.heappush(ready, (-child._sequence_nr(), key))
            # Hold nothing past its run: the node (with what it saved) and the gradients go now.
            del node, outputs
            child = grad = buffer = None
    return runs


def main() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec, out = common.read_probe_spec()
    model, loss = common.build_model_and_loss(spec)
    F.scaled_dot_product_attention = flash_attention
    real_item = torch.Tensor.item
    torch.Tensor.item = lambda t: 1 if t.device.type == "cuda" else real_item(t)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        part_of = {id(m): name.split(".")[0] or "(model)" for name, m in model.named_modules()}
        part_of[id(loss)] = "loss"
        live = LiveBytes()

        def entering(module: torch.nn.Module, _inputs: Any) -> None:
            live.parts.append(part_of.get(id(module), live.parts[-1] if live.parts else "(model)"))

        def leaving(*_: Any) -> None:
            live.parts.pop()

        enter = torch.nn.modules.module.register_module_forward_pre_hook(entering)
        leave = torch.nn.modules.module.register_module_forward_hook(leaving)
        batch = common.clip_batch(spec["frames"], spec["objects"], spec["resolution"], device="cuda")
        dtype = getattr(torch, spec["amp_dtype"]) if spec["amp_dtype"] else None
        with live:
            torch.set_autocast_enabled("cuda", dtype is not None)
            if dtype is not None:
                torch.set_autocast_dtype("cuda", dtype)
            try:
                outputs = model(batch)
                losses = loss(outputs, batch.masks)
            finally:
                torch.set_autocast_enabled("cuda", False)
                torch.clear_autocast_cache()  # as leaving `torch.autocast` does: backward recasts
            del outputs
            gc.collect()
            record = {
                "forward_peak_bytes": live.peak,
                "kept_bytes": live.live,
                "kept_by_part": live.by_creator(),
                "forward_ops": live.ops,
                "forward_device_by_part": {
                    part: {"bytes": work[0], "flops": work[1], "roofline_s": work[2]}
                    for part, work in sorted(live.work.items(), key=lambda item: -item[1][2])
                },
            }
            for key, index in (("bytes", 0), ("flops", 1), ("roofline_s", 2)):
                record[f"forward_{key}"] = sum(work[index] for work in live.work.values())
            core = [losses.pop("core_loss")]
            del losses
            gc.collect()
            live.peak, live.ops, live.counting_work = live.live, 0, False
            record["backward_nodes"] = node_by_node_backward(core)
            gc.collect()
            record["backward_peak_bytes"] = live.peak
            record["backward_ops"] = live.ops
            params = list(model.parameters())
            record["parameter_bytes"] = sum(p.numel() * p.element_size() for p in params)
            record["trainable_bytes"] = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        enter.remove()
        leave.remove()
    record["modules"] = common.imported_packages()
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    sys.path.pop(0)  # run as a script: import the side's packages, not this folder's
    main()
