"""Data parallelism across processes (`torchrun` / `accelerate launch`): ranks, gradient averaging.

Each process computes gradients on its share of the global batch, scaled so that summing over all
processes gives the global-batch mean; one all-reduce per step then leaves every rank with the same
gradient, hence the same update, as a single process running the whole batch.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group that `torchrun` / `accelerate launch` describe in the environment (once)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # Left to interpreter teardown, the backend's worker threads can be destroyed while still
        # joinable, which aborts a process that has finished its work ("terminate called ...").
        atexit.register(_shutdown)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def sum_gradients(params) -> None:
    """All-reduce (sum) the gradients of `params` in one flat buffer."""
    if world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def sum_scalar(x: float) -> float:
    if world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
