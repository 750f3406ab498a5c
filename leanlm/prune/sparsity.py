"""Unstructured and 2:4 semi-structured sparsity: masks by magnitude, Wanda or SparseGPT.

- magnitude: drop the smallest |W|;
- Wanda (Sun et al., 2023): drop the smallest |W_ij| * ||X_j||_2 per output row, no weight update;
- SparseGPT (Frantar & Alistarh, 2023): choose the mask block by block by w^2 / [H^-1]_jj^2 and
  spread each pruned weight's error over the row's remaining columns through the inverse Hessian.

`2:4` keeps the 2 largest of every 4 consecutive weights along the input dimension (the layout sparse
tensor cores run); a float in (0, 1) prunes that fraction of each row. Layers are processed one decoder
layer at a time on the outputs of the already-sparsified ones. `sparsity_masks` fixes the zeros during
later training (distillation).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LeanLMError
from ..quant.sequential import decoder_layers, run_layerwise

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern) -> str | float:
    if str(pattern) == "2:4":
        return "2:4"
    try:
        f = float(str(pattern).rstrip("%")) / (100 if str(pattern).endswith("%") else 1)
    except ValueError:
        f = -1
    if not 0 < f < 1:
        raise LeanLMError(f"sparsity '{pattern}' must be 2:4 or a fraction in (0, 1) like 0.5 or 50%")
    return f


def prune_mask(score: torch.Tensor, pattern: str | float) -> torch.Tensor:
    """True where a weight is kept: the top scores of each row (fraction) or of each group of 4 (2:4)."""
    if pattern == "2:4":
        if score.shape[-1] % 4:
            raise LeanLMError(f"2:4 sparsity needs input widths divisible by 4, got {score.shape[-1]}")
        g = score.reshape(*score.shape[:-1], -1, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, dim=-1).indices, True)
        return keep.reshape(score.shape)
    n_drop = int(score.shape[-1] * pattern)
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_drop:
        keep.scatter_(-1, score.topk(n_drop, dim=-1, largest=False).indices, False)
    return keep


@torch.no_grad()
def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, pattern: str | float, block: int = 128,
              damp: float = 0.01) -> torch.Tensor:
    """The SparseGPT-pruned weight (zeros where pruned, compensated elsewhere)."""
    w = w.detach().float().clone()
    n_in = w.shape[1]
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n_in)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise LeanLMError("SparseGPT: the calibration Hessian is not positive definite: use more calibration "
                          "samples") from None
    if pattern == "2:4":
        block = max(4, block // 4 * 4)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        mask1 = None if pattern == "2:4" else prune_mask(w1 ** 2 / torch.diag(hinv1) ** 2, pattern)
        for i in range(i2 - i1):
            if pattern == "2:4" and i % 4 == 0:  # choose each group of 4 on the weights as updated so far
                mask4 = prune_mask(w1[:, i:i + 4] ** 2 / torch.diag(hinv1)[i:i + 4] ** 2, "2:4")
            keep = mask4[:, i % 4] if pattern == "2:4" else mask1[:, i]
            q = w1[:, i] * keep
            e = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def sparsify(model: nn.Module, method: str = "wanda", pattern="2:4", calib: torch.Tensor | None = None,
             batch_size: int = 4, progress: bool = True) -> nn.Module:
    """Zero weights of every linear layer inside the decoder layers, in place; returns the model."""
    from ..quant.ptq import collect_input_stats

    if method not in METHODS:
        raise LeanLMError(f"unknown sparsity method '{method}': use one of {', '.join(METHODS)}")
    pattern = parse_pattern(pattern)
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        raise LeanLMError("model is quantized: sparsify the float model, then quantize it")
    if method == "magnitude":
        for layer in decoder_layers(model):
            for lin in _linears(layer).values():
                lin.weight.mul_(prune_mask(lin.weight.abs(), pattern))
        return model
    if calib is None:
        raise LeanLMError(f"{method} chooses its masks from calibration data: pass calib (CLI: --calib wiki)")

    def loop(m):
        for i in range(0, len(calib), batch_size):
            m(calib[i:i + batch_size], use_cache=False)

    def one_layer(layer, hidden, kwargs):
        linears = _linears(layer)
        stats, _ = collect_input_stats(layer, linears, hidden, kwargs, hessian=True, sample_tokens=0)
        for name, lin in linears.items():
            h = stats[name].hessian
            if method == "wanda":
                score = lin.weight.abs().float() * torch.diag(h).clamp(min=0).sqrt()
                lin.weight.mul_(prune_mask(score, pattern))
            else:
                lin.weight.copy_(sparsegpt(lin.weight, h, pattern).to(lin.weight.dtype))
        return None

    run_layerwise(model, loop, one_layer, progress, desc=f"{method} masks")
    return model


def sparsity_report(model: nn.Module) -> dict:
    """Fraction of zero weights over the decoder layers' linear layers."""
    zeros = total = 0
    for layer in decoder_layers(model):
        for lin in _linears(layer).values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return {"zero_fraction": zeros / max(total, 1), "weights": total}


def sparsity_masks(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Where the decoder layers' linear weights among `params` are nonzero, by name, for those with
    zeros: the training loop multiplies their gradients by these, so a sparse model keeps its zeros
    (by name rather than by parameter object, which FSDP replaces)."""
    linear = {id(lin.weight) for layer in decoder_layers(model) for lin in _linears(layer).values()}
    masks = {n: p.detach() != 0 for n, p in params.items() if id(p) in linear}
    return {n: m for n, m in masks.items() if not m.all()}
