"""Fully sharded data parallel training (PyTorch FSDP2): each process holds 1/N of the trained model.

`shard` gives the training loop a sharded twin of the model: each decoder layer and then the root are
`fully_shard`-ed, so parameters, gradients and AdamW moments live as dim-0 shards (DTensors) and a
layer's full weights exist only while it runs (gathered in forward, again in backward). Gradients are
reduce-scattered as plain sums, like `distributed.sum_gradients`, so the loop's loss scaling (divide
by the global batch's token count) gives a single process's gradient. `unshard` copies the trained
weights back into the caller's model, which stays a plain module throughout: FSDP swaps the
parameters and the class of the modules it shards, which cannot be undone, hence the twin.

The twin's modules (QuantLinear fake quantization, learned LSQ scales, frozen embeddings) run
unchanged: their forward sees the gathered full weight, and their buffers (shared with the caller's
model, not copied) are small and stay whole on every process.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from . import distributed as dist


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a view: writing it writes the shard); others as they are."""
    return t.to_local() if is_sharded(t) else t


def _twin(model: nn.Module) -> nn.Module:
    """A copy of `model` with its own parameter objects over the same storage, and the same buffers."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def shard(model: nn.Module, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]):
    """Shard `model` over all processes; returns (twin, its `params`, the `masks` sharded alike).

    Entries of `params` that are not `model`'s (a loss's own weights) stay whole on every process. The
    caller's model gives up its weights' memory until `unshard` puts the trained ones back.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import distribute_tensor

    from ..quant.sequential import decoder_layers

    twin = _twin(model)
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.world_size(),))
    for layer in decoder_layers(twin):  # one all-gather / reduce-scatter group per layer: peak memory ~1 layer
        fully_shard(layer, mesh=mesh)
    fully_shard(twin, mesh=mesh)  # the rest: embeddings, final norm, head
    for m in twin.modules():
        if isinstance(m, FSDPModule):
            # Sum, not average: the loop already divides by the global batch. Forcing SUM also avoids
            # PREMUL_SUM, which gloo (CPU) does not have.
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    name = {id(p): n for n, p in model.named_parameters()}
    twin_params = dict(twin.named_parameters())
    params = {k: twin_params[name[id(p)]] if id(p) in name else p for k, p in params.items()}
    masks = {k: distribute_tensor(m.to(params[k].dtype), mesh, params[k].placements, src_data_rank=None)
             if is_sharded(params[k]) else m for k, m in masks.items()}
    for p in model.parameters():  # the shards hold the weights now
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    # The loop's losses never modify a model output in place, which is what this warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return twin, params, masks


@torch.no_grad()
def unshard(model: nn.Module, twin: nn.Module) -> None:
    """Put `twin`'s trained weights, gathered whole, back into `model` (on every process)."""
    trained = dict(twin.named_parameters())
    for n, p in model.named_parameters():  # the same order everywhere: each gather is a collective
        t = trained[n]
        p.data = t.full_tensor() if is_sharded(t) else t.detach()


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """Scale the gradients to a global L2 norm of at most `max_norm`; returns the norm before.

    Shards do not overlap, so their squared norms summed over processes give the full one; whole
    (replicated) gradients count once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = sum(float(local(g).double().pow(2).sum()) for g in grads if is_sharded(g))
    whole = sum(float(g.double().pow(2).sum()) for g in grads if not is_sharded(g))
    norm = math.sqrt(dist.sum_scalar(sharded) + whole)
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for g in grads:
            local(g).mul_(coef)
    return norm
