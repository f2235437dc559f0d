"""torch.distributed in one place: process-group setup and the few collectives the engine uses.

Every helper degrades to the single-process answer when no process group exists, so the loss,
the meters and the trainer can call them unconditionally.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


is_primary = is_main_process


def is_distributed_training_run() -> bool:
    return get_world_size() > 1


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def setup_distributed_backend(backend: str, timeout_mins: float) -> int:
    """Joins the process group described by MASTER_ADDR/PORT, RANK, WORLD_SIZE; returns the rank.

    A single unlaunched process gets a one-member group on a free local port, so the trainer runs
    the same code path on a laptop as on a cluster.
    """
    if is_dist_avail_and_initialized():
        return dist.get_rank()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    # Makes NCCL collectives raise after `timeout_mins` instead of hanging forever.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    logging.info(f"torch.distributed: backend {backend}, timeout {timeout_mins} min")
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_mins))
    return dist.get_rank()


def find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reduce(tensor: Tensor, op: dist.ReduceOp) -> Tensor:
    if not is_distributed_training_run():
        return tensor
    reduced = tensor.clone()
    if dist.get_backend() == "nccl" and not reduced.is_cuda:
        reduced = reduced.cuda()
    dist.all_reduce(reduced, op=op)
    return reduced.to(tensor.device)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    return _reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_mean(tensor: Tensor) -> Tensor:
    return all_reduce_sum(tensor) / get_world_size()


def all_reduce_max(tensor: Tensor) -> Tensor:
    return _reduce(tensor, dist.ReduceOp.MAX)


def all_reduce_min(tensor: Tensor) -> Tensor:
    return _reduce(tensor, dist.ReduceOp.MIN)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank."""
    if not is_distributed_training_run():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed_training_run():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def unwrap_ddp_if_wrapped(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def destroy_process_group() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
