"""Training checkpoints: trained parameters and AdamW state in safetensors, progress in JSON.

The weights file is written (atomically) before the state file that points at it, so a run killed at
any moment resumes from a complete checkpoint. Nothing here unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write_text

WEIGHTS = "checkpoint.safetensors"
STATE = "checkpoint.json"


def save_tensors(path: Path, tensors: dict) -> None:
    """A safetensors file written beside its place and renamed in: never seen half-written."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def has_checkpoint(work: Path) -> bool:
    return (Path(work) / STATE).is_file()


def save_checkpoint(work: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, state: dict) -> None:
    """Save the named trained parameters, their AdamW moments, and `state` (JSON: step, history...)."""
    tensors = {f"param.{n}": p for n, p in params.items()}
    for n, p in params.items():
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{n}.exp_avg"] = st["exp_avg"]
            tensors[f"opt.{n}.exp_avg_sq"] = st["exp_avg_sq"]
            tensors[f"opt.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    work = Path(work)
    save_tensors(work / WEIGHTS, tensors)
    atomic_write_text(work / STATE, json.dumps(state))


def load_checkpoint(work: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> dict:
    """Restore what `save_checkpoint` wrote into `params` and `opt`; returns the saved state."""
    from safetensors.torch import load_file

    work = Path(work)
    state = json.loads((work / STATE).read_text())
    tensors = load_file(str(work / WEIGHTS))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
            if f"opt.{n}.exp_avg" in tensors:
                opt.state[p] = {"exp_avg": tensors[f"opt.{n}.exp_avg"].clone(),
                                "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"].clone(),
                                "step": tensors[f"opt.{n}.step"].reshape(())}
    return state


def remove_checkpoint(work: Path) -> None:
    """Drop a finished run's checkpoint (and its folder, when nothing else, like a teacher cache, is left)."""
    work = Path(work)
    for name in (STATE, WEIGHTS, "train_config.json"):
        (work / name).unlink(missing_ok=True)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
