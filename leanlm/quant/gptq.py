"""GPTQ: quantize a weight column by column, spreading each column's error over the columns not yet
quantized through the inverse Hessian of the layer's inputs (Frantar et al., 2022)."""

from __future__ import annotations

import torch

from ..errors import LeanLMError
from .formats import QParams, QuantSpec, compute_qparams, qdq_with


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block: int = 128, damp: float = 0.01,
         act_order: bool = False, qparams: QParams | None = None) -> tuple[torch.Tensor, QParams]:
    """Return the GPTQ-quantized weight (dequantized values, float32) and the scales it lies on.

    `hessian` is ``sum(x^T x)`` over calibration tokens [in, in]. Groups (``spec.block_size > 0``) get
    their scales when GPTQ reaches them, from the already error-compensated weights; with
    `act_order` columns go in order of decreasing Hessian diagonal and every group's scale is fixed
    up front (static groups), so the saved layout stays the plain group layout. `qparams` fixes every
    scale up front (e.g. from a clipping search).
    """
    w = w.detach().float().clone()
    out_f, in_f = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    g = spec.block_size if spec.block_size > 0 else 0
    gmax = w.abs().amax()
    upfront = qparams or compute_qparams(w, spec, global_amax=gmax)
    dynamic_groups = g > 0 and not act_order and qparams is None
    scales = upfront.scale.clone()
    zeros = None if upfront.zero is None else upfront.zero.clone()

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_f)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise LeanLMError(f"GPTQ: the calibration Hessian is not positive definite even with damp={damp}: "
                          "raise the dampening (damp: 0.1) or use more calibration samples") from None

    if g:
        block = max(g, (block // g) * g)  # blocks hold whole groups, so a group never straddles two
    gscale = upfront.global_scale

    def column_params(grp: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective scale and zero point of every row for the columns of group `grp`."""
        if scales.dim() == 2:  # per-tensor: one scale for all
            s, z = scales.reshape(1).expand(out_f), None if zeros is None else zeros.reshape(1).expand(out_f)
        else:
            s, z = scales[:, grp, 0], None if zeros is None else zeros[:, grp, 0]
        return (s if gscale is None else s * gscale), z

    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        for i in range(i2 - i1):
            orig = int(perm[i1 + i])
            if dynamic_groups and orig % g == 0:
                qp = compute_qparams(w1[:, i:i + g], spec, global_amax=gmax)  # one block per row
                scales[:, orig // g] = qp.scale.reshape(out_f, 1)
                if zeros is not None:
                    zeros[:, orig // g] = qp.zero.reshape(out_f, 1)
            q = qdq_with(w1[:, i], spec, *column_params(orig // g if g else 0))
            q1[:, i] = q
            e = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w = w[:, torch.argsort(perm)]
    qp = QParams(scales, zero=zeros, global_scale=gscale if spec.scale_format == "e4m3" else None)
    return w, qp

