"""Per-input-channel smoothing scales: SmoothQuant's closed form and AWQ's searched scale.

Both return ``s`` for `QuantLinear.apply_smooth`: the weight becomes ``W * s`` and inputs ``x / s``.
"""

from __future__ import annotations

import torch

from .formats import QuantSpec, quant_dequant


def smoothquant_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (Xiao et al., 2023): moves activation outliers into weights."""
    w_absmax = weight.detach().abs().amax(dim=0).float()
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def smoothquant_search(act_absmax: torch.Tensor, weight: torch.Tensor, weight_spec: QuantSpec | None,
                       input_spec: QuantSpec, x: torch.Tensor, alphas=None) -> torch.Tensor:
    """SmoothQuant with the migration strength chosen per layer: the alpha whose quantized output on
    the sample inputs `x` [T, in] is closest to the float output.

    Without `alphas`, the coarse grid 1, 3/4, ..., 0 (steps of 1/4) walked down from 1 while the error
    falls, then the points 1/8 either side of the best: the choice of the whole grid plus those two
    points (the error is near-unimodal in alpha) in 3-5 trials instead of 7, as the best alpha is
    mostly 3/4 to 1."""
    w, x = weight.detach().float(), x.float()
    ref = x @ w.T
    tried: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def trial(a: float) -> torch.Tensor:
        if a not in tried:
            s = smoothquant_scale(act_absmax, w, a)
            ws = w * s if weight_spec is None else quant_dequant(w * s, weight_spec)
            tried[a] = (s, (quant_dequant(x / s, input_spec) @ ws.T - ref).pow(2).mean())
        return tried[a][1]

    if alphas is not None:
        for a in alphas:
            trial(float(a))
    else:
        best = 1.0
        for a in (1.0, 0.75, 0.5, 0.25, 0.0):
            if trial(a) > trial(best):
                break
            best = a
        for a in (best - 0.125, best + 0.125):
            if 0.0 <= a <= 1.0:
                trial(a)
    return min(tried.values(), key=lambda t: t[1])[0]


@torch.no_grad()
def awq_scale(weight: torch.Tensor, spec: QuantSpec, act_absmean: torch.Tensor, gram: torch.Tensor,
              grid: int = 20) -> torch.Tensor:
    """Activation-aware scale search (Lin et al., 2024): s = mean|x|^a / mean|w|^(1-a), with the a in
    [0, 1) whose quantized layer output is closest to the float one over the calibration inputs, whose
    second moment E[x^T x] is `gram` [in, in] (the output error of a weight change d is tr(d G d^T))."""
    w = weight.detach().float()
    g = gram.float()
    w_mean = (w.abs() / w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)).mean(dim=0)
    x_mean = act_absmean.float()
    best_s, best_err = torch.ones_like(x_mean), None
    for i in range(grid):
        a = i / grid
        s = x_mean.clamp(min=1e-4).pow(a) / w_mean.clamp(min=1e-4).pow(1 - a)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
        d = quant_dequant(w * s, spec) / s - w
        err = ((d @ g) * d).sum()
        if best_err is None or err < best_err:
            best_s, best_err = s, err
    return best_s
