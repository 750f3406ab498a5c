"""Least-squares reconstruction of the projections that lose inputs when width is pruned.

Dropping MLP neurons removes input columns of down_proj; dropping query heads removes input columns
of o_proj. The columns that stay can absorb part of what the dropped ones carried, because pruned
and kept activations are correlated: over the calibration tokens X (the original model's inputs to
the projection), the kept columns S are refit to

    W_S' = argmin ||W X - W_S' X_S||^2 = W H[:, S] H[S, S]^-1 = W_S + W_D H[D, S] H[S, S]^-1,
    H = X X^T, D the dropped columns

(with GPTQ's relative dampening on H[S, S]). The output the next layer sees stays as close to the
original as a linear map of the kept activations allows. Projections that keep all their inputs are
left exactly as they were.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Callable

import torch
from torch import nn

from ..errors import LeanLMError
from ..quant.sequential import decoder_layers, run_layerwise
from .shapes import attention_shape, text_config
from .structured import Keep, _index

# projection (inside a decoder layer) -> the Keep axis that selects its input columns
PROJECTIONS = {"mlp.down_proj": "neurons", "self_attn.o_proj": "heads"}


def refit_columns(w: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The kept columns of `w` [out, in], refit so that `w_kept @ x[keep]` best matches `w @ x` over
    inputs whose Gram matrix (sum of x x^T) is `hessian` [in, in].

    Solved as the kept columns plus a correction, W_D H[D, S] H[S, S]^-1, so the dampening only
    shrinks the correction: columns whose dropped partners carried nothing come back unchanged."""
    h = hessian.double()
    dropped = torch.ones(h.shape[0], dtype=torch.bool)
    dropped[keep] = False
    hs = h[keep][:, keep]
    scale = torch.diag(hs).mean()
    if scale <= 0 or not dropped.any():  # nothing to fit against, or nothing lost
        return w[:, keep].clone()
    hs = hs + damp * scale * torch.eye(len(keep), dtype=hs.dtype)
    try:
        chol = torch.linalg.cholesky(hs)
    except torch.linalg.LinAlgError:
        raise LeanLMError("pruning reconstruction: the calibration Gram matrix is singular; use more calibration "
                          "samples or pass reconstruct=False (CLI: --no-reconstruct)") from None
    lost = w.double()[:, dropped] @ h[dropped][:, keep]  # what the dropped columns contributed, seen by the kept
    return (w.double()[:, keep] + torch.cholesky_solve(lost.T, chol).T).to(w.dtype)


@torch.no_grad()
def input_hessians(model: nn.Module, forward_loop: Callable[[nn.Module], None], projections: list[str],
                   progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer: the Gram matrix of each named projection's inputs, layer by layer over the
    float model (one layer's activations in memory at a time)."""
    from ..quant.ptq import collect_input_stats

    grams: list[dict[str, torch.Tensor]] = []

    def one_layer(layer, hidden, kwargs):
        linears = {p: attrgetter(p)(layer) for p in projections}
        stats, outputs = collect_input_stats(layer, linears, hidden, kwargs, hessian=True, sample_tokens=0,
                                             keep_outputs=True)
        grams.append({p: stats[p].hessian for p in projections})
        return outputs

    run_layerwise(model, forward_loop, one_layer, progress, desc="refitting pruned projections")
    return grams


@torch.no_grad()
def reconstruct_pruned(small: nn.Module, model: nn.Module, keep: Keep, forward_loop: Callable[[nn.Module], None],
                       damp: float = 0.01, progress: bool = True) -> nn.Module:
    """Refit `small`'s (made by `apply_keep(model, keep)`) down_proj / o_proj columns in place."""
    n_heads, _, head_dim, _ = attention_shape(model)
    ffn = text_config(model.config).intermediate_size
    full = {"neurons": ffn, "heads": n_heads}
    lost = [p for p, axis in PROJECTIONS.items()
            if any(len(getattr(keep, axis)[i]) < full[axis] for i in keep.layers)]
    if not lost:
        return small
    grams = input_hessians(model, forward_loop, lost, progress)
    hidden = torch.tensor(keep.hidden)
    big_layers, small_layers = decoder_layers(model), decoder_layers(small)
    for new, old in enumerate(sorted(keep.layers)):
        for p in lost:
            cols = _index(PROJECTIONS[p], keep, old, head_dim)
            w = refit_columns(attrgetter(p)(big_layers[old]).weight.float(), grams[old][p], cols, damp)
            target = attrgetter(p)(small_layers[new]).weight
            target.copy_(w.index_select(0, hidden).to(target.dtype))
    return small
