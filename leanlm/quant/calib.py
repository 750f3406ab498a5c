"""Calibration: activation range observers (max, percentile, MSE) and clipping searches for weights.

Observers see activations during calibration forwards and turn them into the `amax` of a static
quantizer. `search_clip` picks, per block, the clipping ratio of a weight's range that minimizes the
quantization error of the weight (MSE calibration) or of the layer's output on sample inputs (AWQ's
clipping search).
"""

from __future__ import annotations

import torch

from ..errors import LeanLMError
from .formats import QParams, QuantSpec, compute_qparams, quant_dequant, to_blocks

METHODS = ("max", "percentile", "mse")


class RangeObserver:
    """Running block-wise max of |x| plus a bounded random sample of values (for percentile and MSE)."""

    def __init__(self, spec: QuantSpec, method: str = "max", percentile: float = 99.99, max_samples: int = 1 << 20):
        if method not in METHODS:
            raise LeanLMError(f"unknown calibration method '{method}': use one of {', '.join(METHODS)}")
        if method != "max" and spec.block_size != 0:
            raise LeanLMError(f"calibration method '{method}' needs a per-tensor activation spec (block_size 0)")
        self.spec, self.method, self.percentile, self.max_samples = spec, method, percentile, max_samples
        self.block_amax: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self._n = 0
        self._gen = torch.Generator().manual_seed(0)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        # Static scales cannot follow tokens: reduce over all rows, one range per block position.
        xb = to_blocks(x.reshape(-1, x.shape[-1]), self.spec.block_size).abs()
        cur = xb.amax(dim=-1, keepdim=True).amax(dim=0)
        self.block_amax = cur if self.block_amax is None else torch.maximum(self.block_amax, cur)
        if self.method != "max":
            flat = x.reshape(-1)
            limit = self.max_samples // 8
            # Small tensors are kept whole: resampling them would weigh some values twice.
            sample = (flat[torch.randint(0, flat.numel(), (limit,), generator=self._gen)] if flat.numel() > limit
                      else flat.clone())
            self.samples.append(sample)
            self._n += len(sample)
            if self._n > self.max_samples:  # keep the sample bounded: drop a random half
                allv = torch.cat(self.samples)
                self.samples = [allv[torch.randperm(len(allv), generator=self._gen)[: self.max_samples // 2]]]
                self._n = len(self.samples[0])

    def amax(self) -> torch.Tensor:
        if self.block_amax is None:
            raise LeanLMError("calibration saw no activations for a quantizer: make forward_loop run the whole model")
        if self.method == "max":
            return self.block_amax
        values = torch.cat(self.samples)
        if self.method == "percentile":
            k = max(1, int(round(len(values) * self.percentile / 100)))
            return values.abs().kthvalue(min(k, len(values))).values.reshape(self.block_amax.shape)
        # MSE: the clipped range whose quantization error on the sample is smallest.
        best, best_err = self.block_amax, None
        for r in torch.linspace(0.3, 1.0, 36):
            amax = self.block_amax * r
            err = (quant_dequant(values, self.spec, compute_qparams(values, self.spec, amax=amax)) - values).pow(2).sum()
            if best_err is None or err < best_err:
                best, best_err = amax, err
        return best


def diagonal_blocks(m: torch.Tensor, b: int) -> torch.Tensor:
    """The [n_blocks, b, b] diagonal blocks of a square matrix, zero-padded like `to_blocks`."""
    pad = (-m.shape[0]) % b
    m = torch.nn.functional.pad(m, (0, pad, 0, pad))
    n = m.shape[0] // b
    return m.reshape(n, b, n, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


@torch.no_grad()
def search_clip(w: torch.Tensor, spec: QuantSpec, x: torch.Tensor | None = None,
                ratios: torch.Tensor | None = None, gram: torch.Tensor | None = None) -> QParams:
    """Per-block clipping of the weight's range minimizing quantization error.

    With the inputs' second moment `gram` = E[x^T x] [in, in] (or sample inputs `x` [T, in] to take it
    from) the error is that of each block's contribution to the layer output (AWQ's clipping search),
    and a row keeps its clipping only where its whole output error is below that without clipping;
    without, the weight's own squared error (MSE calibration).
    """
    ratios = torch.linspace(1.0, 0.5, 21) if ratios is None else ratios
    w = w.detach().float()
    wb = to_blocks(w, spec.block_size)
    amax0 = wb.abs().amax(-1, keepdim=True)
    amin0 = wb.amin(-1, keepdim=True) if not spec.symmetric else None
    amax_hi = wb.amax(-1, keepdim=True) if not spec.symmetric else amax0
    if x is not None:
        x = x.detach().float()
        gram = x.T @ x / x.shape[0]
    block_grams = None
    if gram is not None and spec.block_size != 0:
        # A block's output error E_t (x_tg . d_og)^2 is d_og^T G_g d_og with G_g the block's diagonal
        # slice of E[x^T x]: exact, and out*in*b work per ratio.
        block_grams = diagonal_blocks(gram.float(), w.shape[-1] if spec.block_size == -1 else spec.block_size)
    gmax = w.abs().amax()
    best_err, best_r = None, None
    for r in ratios:
        qp = compute_qparams(w, spec, amax=amax_hi * r, amin=None if amin0 is None else amin0 * r, global_amax=gmax * r)
        d = quant_dequant(w, spec, qp) - w
        db = to_blocks(d, spec.block_size)
        if block_grams is not None:
            err = torch.einsum("ogk,gkl,ogl->og", db, block_grams, db).unsqueeze(-1)  # [out, n_blocks, 1]
        elif gram is not None:  # per-tensor: one block, judged by the whole output
            err = ((d @ gram.float()) * d).sum().reshape(1, 1)
        else:
            err = db.pow(2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_r = err, torch.full_like(err, float(r))
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(err, float(r)), best_r)
    best = compute_qparams(w, spec, amax=amax_hi * best_r, amin=None if amin0 is None else amin0 * best_r,
                           global_amax=gmax * best_r.max())
    if block_grams is None or spec.block_size == -1:
        return best
    # Each block was judged on its own diagonal slice of E[x^T x]; with inputs correlated across blocks
    # (gemma3's outlier features) the blocks' errors add up differently. A row's output error is
    # exact under the whole matrix, so per row keep the clipped scales only where they beat none.
    plain = compute_qparams(w, spec, amax=amax_hi, amin=amin0, global_amax=gmax * best_r.max())
    g = gram.float()

    def row_err(qp: QParams) -> torch.Tensor:
        d = quant_dequant(w, spec, qp) - w
        return ((d @ g) * d).sum(-1)

    keep = (row_err(best) <= row_err(plain))[:, None, None]
    return QParams(torch.where(keep, best.scale, plain.scale),
                   None if best.zero is None else torch.where(keep, best.zero, plain.zero), best.global_scale)
