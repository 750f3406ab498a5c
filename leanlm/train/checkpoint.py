"""Training checkpoints: trained parameters and AdamW state in safetensors, progress in JSON.

Weights go to a file named by step (and, under FSDP, by rank and world size: every process writes its
own shards). The state file that names the step is written (atomically) only once every weights file
of that step is complete, and older weights files are deleted after it, so a run killed at any moment
resumes from a complete checkpoint. Nothing here unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write_text, save_tensors
from ..errors import LeanLMError
from . import distributed as dist
from .sharding import local

STATE = "checkpoint.json"


def shard_name(step: int, rank: int, world: int) -> str:
    return f"checkpoint-step{step}-rank{rank}-of-{world}.safetensors"


def has_checkpoint(work: Path) -> bool:
    return (Path(work) / STATE).is_file()


def _tensors(params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The named parameters and their AdamW moments (this process's shards of sharded ones)."""
    tensors = {f"param.{n}": local(p) for n, p in params.items()}
    for n, p in params.items():
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{n}.exp_avg"] = local(st["exp_avg"])
            tensors[f"opt.{n}.exp_avg_sq"] = local(st["exp_avg_sq"])
            tensors[f"opt.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return tensors


def save_checkpoint(work: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, state: dict,
                    sharded: bool = False) -> None:
    """Save the named trained parameters, their AdamW moments, and `state` (JSON: step, history...).

    Called by the main process only, or with `sharded` (FSDP) by every process, each writing its shards.
    """
    work = Path(work)
    rank, world = (dist.rank(), dist.world_size()) if sharded else (0, 1)
    name = shard_name(state["step"], rank, world)
    save_tensors(work / name, _tensors(params, opt))
    if sharded:
        dist.barrier()  # every shard is complete before the state points at them
    if rank == 0:
        atomic_write_text(work / STATE, json.dumps({**state, "shards": world}))
    if sharded:
        dist.barrier()
    for old in work.glob(f"checkpoint-step*-rank{rank}-of-{world}.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(work: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> dict:
    """Restore what `save_checkpoint` wrote into `params` and `opt`; returns the saved state."""
    from safetensors.torch import load_file

    work = Path(work)
    state = json.loads((work / STATE).read_text())
    shards = state.pop("shards")
    if shards > 1 and shards != dist.world_size():
        raise LeanLMError(f"'{work}' holds a checkpoint sharded over {shards} processes: resume it on {shards} "
                          "processes, or delete the folder to start over")
    tensors = load_file(str(work / shard_name(state["step"], dist.rank() if shards > 1 else 0, shards)))

    def restored(like: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
        t = torch.zeros_like(like)  # sharded like `like`
        local(t).copy_(saved)
        return t

    with torch.no_grad():
        for n, p in params.items():
            local(p).copy_(tensors[f"param.{n}"])
            if f"opt.{n}.exp_avg" in tensors:
                opt.state[p] = {"exp_avg": restored(p, tensors[f"opt.{n}.exp_avg"]),
                                "exp_avg_sq": restored(p, tensors[f"opt.{n}.exp_avg_sq"]),
                                "step": tensors[f"opt.{n}.step"].reshape(())}
    return state


def remove_checkpoint_files(work: Path) -> None:
    """Drop the state and weights of a finished run's checkpoint (the rest of `work` stays)."""
    work = Path(work)
    (work / STATE).unlink(missing_ok=True)
    for weights in work.glob("checkpoint-step*-rank*-of-*.safetensors*"):  # (and any .tmp left)
        weights.unlink()


def remove_checkpoint(work: Path) -> None:
    """Drop a finished run's checkpoint and settings (and its folder, when nothing else, like a teacher
    cache, is left)."""
    work = Path(work)
    remove_checkpoint_files(work)
    (work / "train_config.json").unlink(missing_ok=True)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
