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

    Without `alphas`, a coarse grid (steps of 1/4) and then the two points 1/8 either side of its best:
    7 trials to a resolution of 1/8 (the error is near-unimodal in alpha)."""
    w, x = weight.detach().float(), x.float()
    ref = x @ w.T
    tried: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def trial(a: float) -> None:
        if a in tried or not 0.0 <= a <= 1.0:
            return
        s = smoothquant_scale(act_absmax, w, a)
        ws = w * s if weight_spec is None else quant_dequant(w * s, weight_spec)
        tried[a] = (s, (quant_dequant(x / s, input_spec) @ ws.T - ref).pow(2).mean())

    for a in ([0.0, 0.25, 0.5, 0.75, 1.0] if alphas is None else alphas):
        trial(float(a))
    if alphas is None:
        best = min(tried, key=lambda a: tried[a][1])
        trial(best - 0.125)
        trial(best + 0.125)
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
