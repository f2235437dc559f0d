"""Child process for bench_host_ops.py: the ops one side dispatches in a training step, by part.

The model and loss (`--spec`, resolved Hydra configs) are built by whichever `sam2`/`training`
is first on `PYTHONPATH` and run one training step (forward, loss, backward) on real CPU tensors
after one warm-up step, with the code paths a GPU takes where ours chooses by device (Hiera's
padded windows attend as one batch). Counted: the ops that would launch kernels on a GPU (not
views, allocations or `prim` queries), in forward by the top-level module running, in backward by
the module whose forward made the autograd node running; and the Python function calls of a
step. In a host-bound GPU step, these are the host's work.

    python benchmarks/host_ops_probe.py --spec spec.json --out record.json
"""

from __future__ import annotations

import collections
import cProfile
import importlib.util
import json
import pstats
import sys
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# The side-neutral helpers of common.py, loaded by path (this runs with one side's packages first).
_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

UNTAGGED = "(untagged)"


class Parts:
    """The top-level parts whose forwards are running, innermost last (module hooks keep it)."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module) -> None:
        self.part_of = {id(m): name.split(".")[0] or "(model)" for name, m in model.named_modules()}
        self.part_of[id(loss)] = "loss"
        self.stack: list[str] = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "(outside modules)"

    def enter(self, module: torch.nn.Module, _inputs: Any) -> None:
        self.stack.append(self.part_of.get(id(module), self.current))

    def leave(self, *_: Any) -> None:
        self.stack.pop()


class TagNodes(TorchFunctionMode):
    """Marks each autograd node that forward creates with the part running (`node.metadata`),
    walking back from every output through nodes not yet marked (composite ops make inner nodes
    that no output shows)."""

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.parts = parts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        todo = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or "part" in node.metadata:
                continue
            node.metadata["part"] = self.parts.current
            todo.extend(next_node for next_node, _ in node.next_functions)
        return out


class CountOps(TorchDispatchMode):
    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.parts = parts
        self.backward = False
        self.forward_ops: collections.Counter = collections.Counter()
        self.backward_ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if common.launches_kernels(func):
            if self.backward:
                node = torch._C._current_autograd_node()
                self.backward_ops[UNTAGGED if node is None else node.metadata.get("part", UNTAGGED)] += 1
            else:
                self.forward_ops[self.parts.current] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    spec, out = common.read_probe_spec()
    model, loss = common.build_model_and_loss(spec)
    for module in model.modules():
        if hasattr(module, "attend_padding"):  # ours chooses by device; a GPU attends padding
            module.attend_padding = True
    parts = Parts(model, loss)
    enter = torch.nn.modules.module.register_module_forward_pre_hook(parts.enter)
    leave = torch.nn.modules.module.register_module_forward_hook(parts.leave)
    batch = common.clip_batch(spec["frames"], spec["objects"], spec["resolution"])
    count = CountOps(parts)

    def step(profile: cProfile.Profile | None = None, counting: bool = False) -> None:
        torch.manual_seed(1)  # the same prompts and dropout in every step
        model.zero_grad(set_to_none=True)
        if profile is not None:
            profile.enable()
        core = loss(model(batch), batch.masks)["core_loss"]
        count.backward = counting
        core.backward()
        if profile is not None:
            profile.disable()

    step()  # warm-up: per-size caches filled, as in every step after the first
    with TagNodes(parts), count:
        step(counting=True)
    profile = cProfile.Profile()
    step(profile)
    enter.remove()
    leave.remove()
    record = {
        "forward_ops": sum(count.forward_ops.values()),
        "backward_ops": sum(count.backward_ops.values()),
        "forward_ops_by_part": dict(count.forward_ops.most_common()),
        "backward_ops_by_part": dict(count.backward_ops.most_common()),
        "python_calls": pstats.Stats(profile).total_calls,
        "modules": common.imported_packages(),
    }
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    sys.path.pop(0)  # run as a script: import the side's packages, not this folder's
    main()
