"""Least-squares reconstruction of the projections that lose inputs when width or depth is pruned.

Dropping MLP neurons removes input columns of down_proj; dropping query heads removes input columns
of o_proj. The columns that stay can absorb part of what the dropped ones carried, because pruned
and kept activations are correlated: over the calibration tokens X (the original model's inputs to
the projection), the kept columns S are refit to

    W_S' = argmin ||W X - W_S' X_S||^2 = W H[:, S] H[S, S]^-1 = W_S + W_D H[D, S] H[S, S]^-1,
    H = X X^T, D the dropped columns

(with GPTQ's relative dampening on H[S, S]). The output the next layer sees stays as close to the
original as a linear map of the kept activations allows. Projections that keep all their inputs are
left exactly as they were.

Which MLP neurons stay is chosen the same way (`select_columns`): greedy Optimal Brain Surgeon over
down_proj's columns, as in ZipLM, dropping first the neurons whose loss the refit of the others makes
up for best (SmolLM2 cut to 70%: 33.9 -> 30.0 perplexity before distillation, against choosing them
by mean activation).

Depth pruning gets the same kind of fit: where layers p+1..q are dropped, the residual stream after
them moved by Δ = h_q - h_p on top of layer p's output. Layer p's down_proj is refit so that it also
writes the part of Δ that is linear in its inputs, W' = argmin ||W X + Δ - W' X||^2 (SmolLM2 cut to
21 of 30 layers: 63.0 -> 40.0 perplexity before distillation). Architectures that normalize the MLP's
output before adding it (Gemma's post_feedforward_layernorm) make that map non-linear and are left
without it.
"""

from __future__ import annotations

import logging
from operator import attrgetter
from typing import Callable

import torch
from torch import nn

from ..errors import LeanLMError
from ..quant.sequential import decoder_layers, run_layerwise
from .shapes import attention_shape, text_config
from .structured import Keep, _index

log = logging.getLogger(__name__)

# projection (inside a decoder layer) -> the Keep axis that selects its input columns
PROJECTIONS = {"mlp.down_proj": "neurons", "self_attn.o_proj": "heads"}


def refit_columns(w: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float = 0.01,
                  cross: torch.Tensor | None = None) -> torch.Tensor:
    """The kept columns of `w` [out, in], refit so that `w_kept @ x[keep]` best matches `w @ x` (plus
    a target `d` whose cross term sum d x^T is `cross` [out, in]) over inputs whose Gram matrix (sum
    of x x^T) is `hessian` [in, in].

    Solved as the kept columns plus a correction, (W_D H[D, S] + cross[:, S]) H[S, S]^-1, so the
    dampening only shrinks the correction: columns whose dropped partners carried nothing come back
    unchanged."""
    h = hessian.double()
    dropped = torch.ones(h.shape[0], dtype=torch.bool)
    dropped[keep] = False
    hs = h[keep][:, keep]
    if torch.diag(hs).mean() <= 0 or not (dropped.any() or cross is not None):  # nothing to fit, or nothing lost
        return w[:, keep].clone()
    chol = _damped_cholesky(hs, damp)
    lost = w.double()[:, dropped] @ h[dropped][:, keep]  # what the dropped columns contributed, seen by the kept
    if cross is not None:
        lost = lost + cross.double()[:, keep]
    return (w.double()[:, keep] + torch.cholesky_solve(lost.T, chol).T).to(w.dtype)


def _damped_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.double()
    try:
        return torch.linalg.cholesky(h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype))
    except torch.linalg.LinAlgError:
        raise LeanLMError("pruning reconstruction: the calibration Gram matrix is singular; use more calibration "
                          "samples or pass reconstruct=False (CLI: --no-reconstruct)") from None


@torch.no_grad()
def select_columns(w: torch.Tensor, hessian: torch.Tensor, n_keep: int, rounds: int = 32,
                   damp: float = 0.01) -> list[int]:
    """The `n_keep` input columns of `w` [out, in] to keep: greedy OBS (smallest ||w_j||^2 / [H^-1]_jj
    goes first, the rest compensating each time), dropping columns in `rounds` batches."""
    hinv = torch.cholesky_inverse(_damped_cholesky(hessian, damp))
    w = w.double()
    alive = torch.arange(w.shape[1])
    per = -(-(len(alive) - n_keep) // rounds)
    while len(alive) > n_keep:
        cost = (w * w).sum(0) / torch.diag(hinv)
        g = cost.topk(min(per, len(alive) - n_keep), largest=False).indices
        stay = torch.ones(len(alive), dtype=torch.bool)
        stay[g] = False
        # The dropped block's optimal compensation, then the inverse Hessian of the columns that stay.
        solve = torch.linalg.solve(hinv[g][:, g], hinv[g])
        w = (w - w[:, g] @ solve)[:, stay]
        hinv = (hinv - hinv[:, g] @ solve)[stay][:, stay]
        alive = alive[stay]
    return alive.tolist()


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


def lost_projections(model: nn.Module, keep: Keep) -> list[str]:
    """The projections of PROJECTIONS that lose input columns under `keep`."""
    n_heads = attention_shape(model)[0]
    full = {"neurons": text_config(model.config).intermediate_size, "heads": n_heads}
    return [p for p, axis in PROJECTIONS.items() if any(len(getattr(keep, axis)[i]) < full[axis] for i in keep.layers)]


@torch.no_grad()
def select_neurons(model: nn.Module, grams: list[dict[str, torch.Tensor]], keep: Keep) -> list[list[int]]:
    """Per decoder layer, the MLP neurons `select_columns` keeps, as many as `keep` keeps (grams from
    `input_hessians`); layers that `keep` drops keep their entry as it is."""
    n_keep = len(keep.neurons[keep.layers[0]])
    kept = set(keep.layers)
    return [select_columns(layer.mlp.down_proj.weight.float(), grams[i]["mlp.down_proj"], n_keep) if i in kept
            else keep.neurons[i] for i, layer in enumerate(decoder_layers(model))]


def skipped_runs(kept: list[int], n_layers: int) -> dict[int, int]:
    """Kept layer p -> the last layer q of the dropped run right after it (only where one follows)."""
    kept = set(kept)
    runs = {}
    for p in sorted(kept):
        q = p
        while q + 1 < n_layers and q + 1 not in kept:
            q += 1
        if q > p:
            runs[p] = q
    return runs


@torch.no_grad()
def skipped_contributions(model: nn.Module, forward_loop: Callable[[nn.Module], None],
                          runs: dict[int, int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each run p -> q: the Gram matrix of layer p's down_proj inputs X and the cross term
    (h_q - h_p) X^T, over one forward loop of the original model."""
    layers = decoder_layers(model)
    ends = {q: [p for p in runs if runs[p] == q] for q in runs.values()}
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens_of(x):
        return x.reshape(-1, x.shape[-1]).double()

    def on_down(mod, args, p):
        inputs[p] = tokens_of(args[0])

    def on_layer(mod, args, out, i):
        outputs[i] = tokens_of(out[0] if isinstance(out, tuple) else out)
        for p in ends.get(i, []):
            x, d = inputs.pop(p), outputs[i] - outputs.pop(p)
            h, c = sums.get(p, (0.0, 0.0))
            sums[p] = (h + x.T @ x, c + d.T @ x)

    handles = [layers[p].mlp.down_proj.register_forward_pre_hook(lambda m, a, p=p: on_down(m, a, p)) for p in runs]
    handles += [layers[i].register_forward_hook(lambda m, a, o, i=i: on_layer(m, a, o, i))
                for i in set(runs) | set(ends)]
    try:
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    return sums


def _adds_mlp_output_linearly(layer: nn.Module) -> bool:
    return getattr(layer, "post_feedforward_layernorm", None) is None


@torch.no_grad()
def reconstruct_pruned(small: nn.Module, model: nn.Module, keep: Keep, forward_loop: Callable[[nn.Module], None],
                       damp: float = 0.01, progress: bool = True,
                       grams: list[dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Refit `small`'s (made by `apply_keep(model, keep)`) down_proj / o_proj columns in place, for
    the neurons and heads and the layers it lost (`grams`: the original's input Gram matrices when
    already computed, else measured here)."""
    head_dim = attention_shape(model)[2]
    lost = lost_projections(model, keep)
    big_layers, small_layers = decoder_layers(model), decoder_layers(small)
    runs = skipped_runs(keep.layers, len(big_layers))
    if runs and not _adds_mlp_output_linearly(big_layers[0]):
        log.info(f"{type(model).__name__} normalizes its MLP output: no refit for the dropped layers")
        runs = {}
    if lost and (grams is None or any(p not in grams[0] for p in lost)):
        grams = input_hessians(model, forward_loop, lost, progress)
    skipped = skipped_contributions(model, forward_loop, runs) if runs else {}
    hidden = torch.tensor(keep.hidden)
    for new, old in enumerate(sorted(keep.layers)):
        for p in set(lost) | ({"mlp.down_proj"} if old in skipped else set()):
            hessian, cross = skipped[old] if p == "mlp.down_proj" and old in skipped else (grams[old][p], None)
            cols = _index(PROJECTIONS[p], keep, old, head_dim)
            w = refit_columns(attrgetter(p)(big_layers[old]).weight.float(), hessian, cols, damp, cross)
            target = attrgetter(p)(small_layers[new]).weight
            target.copy_(w.index_select(0, hidden).to(target.dtype))
    return small
