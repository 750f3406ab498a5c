"""QuantLinear: an nn.Linear whose weight (and optionally input) goes through a quantizer.

Two states:
- *fake*: the float weight is kept and fake-quantized on every forward, with straight-through
  gradients (calibration searches and QAT work here);
- *frozen*: the weight lives only as compact codes and scales (what is saved and counted as the
  model's size); the forward dequantizes once and caches the float weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanLMError
from .formats import QParams, QuantSpec, compute_qparams, dequantize_blocks, fake_quantize, quantize_blocks, to_blocks
from .packing import decode_qparams, decode_values, encode_qparams, encode_values


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool,
                 weight_spec: QuantSpec | None, input_spec: QuantSpec | None = None):
        super().__init__()
        if input_spec is not None and not input_spec.dynamic and not input_spec.symmetric:
            raise LeanLMError("static asymmetric input quantization is not supported: "
                              "make the input spec symmetric or dynamic")
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.input_spec = weight_spec, input_spec
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.weight_qp: QParams | None = None  # fixed by calibration; None = computed from the weight
        self.register_buffer("input_amax", None)  # static input scale from calibration
        self._dequant_cache: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: QuantSpec | None,
                    input_spec: QuantSpec | None = None) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec, input_spec)
        q.weight = linear.weight
        q.bias = linear.bias
        return q

    @property
    def frozen(self) -> bool:
        return "weight_codes" in self._buffers

    # -- weight ---------------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward sees it (dequantized), with STE gradients in the fake state."""
        if self.weight_spec is None:
            return self.weight
        if self.frozen:
            if self._dequant_cache is None:
                self._dequant_cache = self._dequantize_frozen()
            return self._dequant_cache
        return fake_quantize(self.weight, self.weight_spec, self.weight_qp)

    def freeze(self) -> None:
        """Replace the float weight by its codes and scales (irreversible; what `save` stores)."""
        if self.weight_spec is None or self.frozen:
            return
        w = self.weight.detach()
        qp = self.weight_qp or compute_qparams(w, self.weight_spec)
        q = quantize_blocks(w, self.weight_spec, qp)
        dtype = w.dtype
        del self.weight
        self.register_buffer("weight_codes", encode_values(q, self.weight_spec))
        for k, v in encode_qparams(qp, self.weight_spec).items():
            self.register_buffer(f"weight_{k}", v)
        self._weight_dtype = dtype
        self.weight_qp = None
        self._dequant_cache = None

    def _blocked_shape(self) -> torch.Size:
        probe = torch.empty(self.out_features, self.in_features, device="meta")
        return to_blocks(probe, self.weight_spec.block_size).shape

    def _dequantize_frozen(self) -> torch.Tensor:
        spec = self.weight_spec
        q = decode_values(self.weight_codes, spec, self._blocked_shape())
        qp = decode_qparams({k: self._buffers.get(f"weight_{k}") for k in ("scale", "zero", "global_scale")}, spec)
        w = dequantize_blocks(q, spec, qp, torch.Size((self.out_features, self.in_features)))
        return w.to(getattr(self, "_weight_dtype", torch.float32))

    def allocate_frozen(self, dtype: torch.dtype = torch.float32) -> None:
        """Create empty frozen buffers of the right shapes so a saved state dict can be loaded into them."""
        w = torch.zeros(self.out_features, self.in_features)
        qp = compute_qparams(w, self.weight_spec)
        self.weight_qp = qp
        self.freeze()
        self._weight_dtype = dtype

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequant_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_spec is not None:
            qp = None
            if not self.input_spec.dynamic:
                if self.input_amax is None:
                    raise RuntimeError("static input quantizer is not calibrated: pass calibration data to quantize()")
                qp = compute_qparams(x, self.input_spec, amax=self.input_amax)
            x = fake_quantize(x, self.input_spec, qp)
        w = self.quantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        w = "none" if self.weight_spec is None else f"{self.weight_spec.format}/b{self.weight_spec.block_size}"
        a = "none" if self.input_spec is None else f"{self.input_spec.format}/b{self.input_spec.block_size}"
        return f"in={self.in_features}, out={self.out_features}, weight={w}, input={a}, frozen={self.frozen}"
