"""QuantLinear: an nn.Linear whose weight, input and output go through quantizers.

Two states:
- *fake*: the float weight is kept and fake-quantized on every forward, with straight-through
  gradients (calibration searches and QAT work here);
- *frozen*: the weight lives only as compact codes and scales (what is saved and counted as the
  model's size). Eager forwards dequantize once and cache the float weight (fast evaluation) unless
  `cache_dequantized` is off; inside `torch.compile` (the decode engine) the dequantization is part of
  the graph and fuses with the matrix-vector product (`leanlm.kernels`), so no float copy exists.

`smooth` (SmoothQuant, AWQ) is a per-input-channel scale ``s``: the stored weight is ``W * s`` and the
input is divided by ``s`` before it is quantized, so the product is unchanged in exact arithmetic
while outlier channels move from the activations into the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanLMError
from ..kernels import (few_rows, fused_rows, int4_kernel_fits, int4_linear, int8_fused_is_fast, int8_kernel_fits,
                       int8_linear, linear, pack_int4, unpack_int4, w8a8_linear)
from .formats import (QParams, QuantSpec, compute_qparams, dequantize_blocks, effective_scale, fake_quantize,
                      fake_quantize_lsq, quantize_blocks)
from .packing import (decode_pairs, decode_qparams, decode_values, encode_qparams, encode_values, pack_nibbles,
                      unpack_nibbles)

# Buffers whose shapes are only known after calibration; restored from the saved file as they are.
CALIBRATED_BUFFERS = ("smooth", "input_amax", "output_amax")


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, weight_spec: QuantSpec | None,
                 input_spec: QuantSpec | None = None, output_spec: QuantSpec | None = None):
        super().__init__()
        for kind, spec in (("input", input_spec), ("output", output_spec)):
            if spec is not None and not spec.dynamic and not spec.symmetric:
                raise LeanLMError(f"static asymmetric {kind} quantization is not supported: "
                                  f"make the {kind} spec symmetric or dynamic")
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.input_spec, self.output_spec = weight_spec, input_spec, output_spec
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.weight_qp: QParams | None = None  # fixed by clipping search or GPTQ; None = from the weight
        self.learned_scale: nn.Parameter | None = None  # per-block weight scales trained by LSQ (learn_scales)
        for name in CALIBRATED_BUFFERS:
            self.register_buffer(name, None)
        self._dequant_cache: torch.Tensor | None = None
        self._weight_dtype = torch.float32  # of the float weight `freeze` replaced
        self.cache_dequantized = True
        self._kernel: tuple | None = None  # (kind, tensors...) once `pack` chose a packed kernel
        self.packed = False  # `pack` was called: no float copy of the weight is ever kept
        self.keep_codes = False  # a tied embedding reads rows of the codes: packing keeps them
        self.bypass = False  # plain float forward (capturing calibration inputs and statistics)
        self.observers: dict | None = None  # {"input"/"output": RangeObserver} while calibrating ranges
        self.scale_grad = True  # training: gradients reach dynamic activation scales too (see `fake_quantize`)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: QuantSpec | None, input_spec: QuantSpec | None = None,
                    output_spec: QuantSpec | None = None) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec, input_spec,
                output_spec)
        q.weight = linear.weight
        q.bias = linear.bias
        return q

    @property
    def frozen(self) -> bool:
        return "weight_codes" in self._buffers

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the forward sees the weight in (a frozen layer's dequantized weight: the model's)."""
        return self._weight_dtype if self.frozen else self.weight.dtype

    # -- weight ---------------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward sees it (dequantized), with STE gradients in the fake state."""
        if self.weight_spec is None:
            return self.weight
        if self.frozen:
            if torch.compiler.is_compiling() or not self.cache_dequantized:
                return self._dequantize_frozen()
            if self._dequant_cache is None:
                self._dequant_cache = self._dequantize_frozen()
            return self._dequant_cache
        if self.learned_scale is not None:
            return fake_quantize_lsq(self.weight, self.weight_spec, self.learned_scale)
        return fake_quantize(self.weight, self.weight_spec, self.weight_qp)

    def weight_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight as the forward sees it (``ids.shape + [K]``): a tied embedding's lookups.

        A frozen layer decodes only those rows from its codes; smoothing is undone (``(x / s) @ Wq.T``
        reads row ``Wq[i] / s``)."""
        spec, n, k = self.weight_spec, self.out_features, self.in_features
        groups, block = (1, k) if spec is None or spec.block_size == 0 else self._blocked_shape()[1:]
        if (not self.frozen or self._dequant_cache is not None or self._buffers["weight_codes"] is None
                or (spec.bits <= 4 and groups * block % 2)):  # (odd rows of nibbles share bytes)
            rows = nn.functional.embedding(ids, self.quantized_weight())
        else:
            flat = ids.reshape(-1)
            q = decode_values(self.weight_codes.reshape(n, -1)[flat], spec, torch.Size((flat.numel(), groups, block)))
            qp = self._frozen_qparams()
            if spec.block_size != 0:  # per-row / per-group scales: those of the rows looked up
                pick = lambda t: None if t is None else t.reshape(n, groups, 1)[flat]  # noqa: E731
                qp = QParams(pick(qp.scale), pick(qp.zero), qp.global_scale)
            rows = dequantize_blocks(q, spec, qp, torch.Size((flat.numel(), k)))
            rows = rows.to(self.weight_dtype).reshape(*ids.shape, k)
        return rows if self.smooth is None else rows / self.smooth.to(rows.dtype)

    def drop_dequantized(self) -> None:
        """Forget the cached float weight of a frozen layer (the next eager forward rebuilds it)."""
        self._dequant_cache = None

    def learn_scales(self) -> None:
        """Make the weight's per-block scales a trained parameter (LSQ), starting from the current ones."""
        if self.weight_spec is None or self.frozen or self.learned_scale is not None:
            return
        qp = self.weight_qp or compute_qparams(self.weight.detach(), self.weight_spec)
        self.learned_scale = nn.Parameter(effective_scale(qp).clone())

    def apply_smooth(self, s: torch.Tensor) -> None:
        """Multiply the weight's input channels by `s` (and divide inputs by it from now on)."""
        if self.frozen:
            raise RuntimeError("cannot smooth a frozen layer")
        with torch.no_grad():
            self.weight.mul_(s.to(self.weight.dtype))
        self.smooth = s.detach().float() if self.smooth is None else self.smooth * s.detach().float()
        self.weight_qp = None

    def freeze(self) -> None:
        """Replace the float weight by its codes and scales (irreversible; what `save` stores)."""
        if self.weight_spec is None or self.frozen:
            return
        w = self.weight.detach()
        if self.learned_scale is not None:  # the learned scales, stored in the format's scale encoding
            amax = self.learned_scale.detach() * self.weight_spec.element.range
            self.weight_qp = compute_qparams(w, self.weight_spec, amax=amax)
            del self.learned_scale
            self.learned_scale = None
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

    def _block_len(self) -> int:
        """Weights per block along a row: the whole row for per-channel (-1) and per-tensor (0) scales."""
        b = self.weight_spec.block_size
        return self.in_features if b in (0, -1) else b

    def _blocked_shape(self) -> torch.Size:
        if self.weight_spec.block_size == 0:
            return torch.Size((1, self.out_features * self.in_features))
        b = self._block_len()
        return torch.Size((self.out_features, -(-self.in_features // b), b))

    def _frozen_qparams(self) -> QParams:
        names = ("scale", "zero", "global_scale")
        return decode_qparams({k: self._buffers.get(f"weight_{k}") for k in names}, self.weight_spec)

    def codes(self) -> torch.Tensor:
        """The stored codes (leanlm's layout); a packed INT4 layer keeps only the kernel's layout and
        rebuilds them from it on demand (saving, exporting, unpacking)."""
        if self._buffers["weight_codes"] is not None:
            return self.weight_codes
        packed = unpack_int4(self._kernel[1])  # unsigned, [N, G * g]
        return pack_nibbles(packed ^ 8 if self.weight_spec.symmetric else packed)

    def _dequantize_frozen(self) -> torch.Tensor:
        spec = self.weight_spec
        q = decode_values(self.codes(), spec, self._blocked_shape())
        w = dequantize_blocks(q, spec, self._frozen_qparams(), torch.Size((self.out_features, self.in_features)))
        return w.to(self.weight_dtype)

    def _fused_frozen_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` straight from the codes, block by block, for few rows inside torch.compile.

        Written so that inductor emits one loop over the stored bytes: per block, codes (both nibbles
        of a 4-bit byte at once, against the even and odd inputs) times inputs, times the block scale.
        """
        spec, n, k = self.weight_spec, self.out_features, self.in_features
        b = self._block_len()
        groups = -(-k // b)
        qp = self._frozen_qparams()
        s = effective_scale(qp).reshape(-1, groups, 1) if spec.block_size else effective_scale(qp).reshape(1, 1, 1)
        z = None if qp.zero is None else qp.zero.reshape(s.shape)
        xb = torch.nn.functional.pad(x.float(), (0, groups * b - k)).reshape(*x.shape[:-1], 1, groups, b)
        if spec.element.bits <= 4:
            lo, hi = decode_pairs(self.codes(), spec, (n, groups, b // 2))
            if z is not None:
                lo, hi = lo - z, hi - z
            y = ((lo * xb[..., 0::2] + hi * xb[..., 1::2]) * s).sum((-1, -2))
        else:
            q = decode_values(self.codes(), spec, torch.Size((n, groups, b)))
            if z is not None:
                q = q - z
            y = (q * xb * s).sum((-1, -2))
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def pack(self) -> str | None:
        """Run from the stored codes from now on, never keeping a float copy of the weight.

        Picks PyTorch's CPU kernel where the layout has one: ``int4`` (groups, tinygemm layout, which
        then holds the codes: one copy), ``int8`` (per-channel weight-only) or ``w8a8`` (per-channel int8 weights,
        int8 activations per tensor or per token). Other formats dequantize inside each forward (inside
        `torch.compile` that fuses with the product). Returns the kernel used, or None.
        """
        if self.packed and self._kernel is not None:  # already packed (its codes live in the kernel)
            return self._kernel[0]
        self.cache_dequantized, self._dequant_cache, self._kernel, self.packed = False, None, None, True
        spec, n, k = self.weight_spec, self.out_features, self.in_features
        if not self.frozen or self.weight_codes.device.type != "cpu":
            return None  # CUDA: dequantized inside the (compiled) forward; these kernels are CPU layouts
        if spec.format == "int4" and spec.block_size > 0 and int4_kernel_fits(n, spec.block_size):
            shape = self._blocked_shape()  # [N, G, g], partial group zero-padded
            # Unsigned 4-bit codes straight from the nibbles (no float copy): two's complement + 8 is a flip of bit 3.
            q = unpack_nibbles(self.weight_codes, shape.numel()).reshape(shape[0], -1)
            qp = self._frozen_qparams()
            s = effective_scale(qp).reshape(shape[0], shape[1])
            if spec.symmetric:
                zero = torch.zeros_like(s)
                q = q ^ 8
            else:  # (q - z) * s == (q - 8) * s + (8 - z) * s
                zero = (8 - qp.zero.reshape(s.shape)) * s
            packed, sz = pack_int4(q, s, zero)
            self._kernel = ("int4", packed, sz, spec.block_size)
            if not self.keep_codes:
                self.weight_codes = None  # same bytes as the kernel's layout: keep one copy (see `codes`)
        elif spec.format == "int8" and spec.block_size == -1 and spec.symmetric:
            w = self.weight_codes.reshape(n, k)  # a view: the codes are already the kernel's layout
            s = self.weight_scale.reshape(n).float()
            inp = self.input_spec
            if inp is None and int8_kernel_fits(k):
                self._kernel = ("int8", w, s)
            elif inp is not None and inp.format == "int8" and inp.symmetric and inp.block_size in (0, -1):
                self._kernel = ("w8a8", w.t(), s)
        return None if self._kernel is None else self._kernel[0]

    def unpack(self) -> None:
        """Undo `pack`: eager forwards cache the dequantized weight again."""
        if self.frozen:
            self.weight_codes = self.codes()
        self.cache_dequantized, self._kernel, self.packed = True, None, False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.frozen and self._buffers["weight_codes"] is None:
            destination[prefix + "weight_codes"] = self.codes()

    def _kernel_for(self, x: torch.Tensor) -> str | None:
        """The packed kernel this call uses. Inside torch.compile: the int4 kernel; the int8 one only where
        inductor's fused int8 reduction is slow (AVX2, see `int8_fused_is_fast`; on AVX-512 that reduction
        is 1.5x faster); never `_int_mm`, since a compiled W8A8 decode step with it produced wrong tokens
        on SmolLM2 (bf16, torch 2.13). The engine test checks compiled == eager decoding for each."""
        if self._kernel is None or self.observers is not None:
            return None
        if torch.compiler.is_compiling():
            kind = self._kernel[0]
            fits = kind == "int4" or (kind == "int8" and not int8_fused_is_fast())
            return kind if fits and few_rows(x) else None
        return self._kernel[0]

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        kind, *t = self._kernel
        if kind == "int4":
            return int4_linear(x, *t, self.bias)
        if kind == "int8":
            return int8_linear(x, *t, self.bias)
        w_t, s = t
        spec = self.input_spec
        qp = compute_qparams(x, spec, amax=None if spec.dynamic else self.input_amax)
        xq = quantize_blocks(x, spec, qp).reshape(x.shape).to(torch.int8)
        return w8a8_linear(xq, effective_scale(qp).reshape(*x.shape[:-1], 1) if spec.block_size == -1
                           else effective_scale(qp).reshape(()), w_t, s, self.bias, x.dtype)

    def allocate_frozen(self, dtype: torch.dtype = torch.float32) -> None:
        """Create empty frozen buffers of the right shapes so a saved state dict can be loaded into them."""
        zeros = torch.zeros(self.out_features, self.in_features, device=self.weight.device)  # meta: shapes only
        self.weight_qp = compute_qparams(zeros, self.weight_spec)
        self.freeze()
        self._weight_dtype = dtype

    def _load_from_state_dict(self, *args, **kwargs):
        if self.frozen and self._buffers["weight_codes"] is None:
            self.weight_codes = self.codes()  # a packed layer takes codes again
        self._dequant_cache = None
        self._kernel = None
        self.packed = False
        return super()._load_from_state_dict(*args, **kwargs)

    # -- forward --------------------------------------------------------------------------------
    def _quantize_activation(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        spec = getattr(self, f"{kind}_spec")
        if spec is None:
            return x
        if self.observers is not None and kind in self.observers:
            self.observers[kind].observe(x)
            return x
        if spec.dynamic:
            return fake_quantize(x, spec, scale_grad=self.scale_grad)
        amax = getattr(self, f"{kind}_amax")
        if amax is None:
            raise RuntimeError(f"static {kind} quantizer is not calibrated: pass calibration data to quantize()")
        return fake_quantize(x, spec, compute_qparams(x, spec, amax=amax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return F.linear(x, self.weight, self.bias)
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        kind = self._kernel_for(x)
        if kind == "w8a8":
            y = self._kernel_product(x)  # quantizes the activation itself, to int8 codes
        else:
            x = self._quantize_activation(x, "input")
            if kind is not None:
                y = self._kernel_product(x)
            elif self.frozen and fused_rows(x) and (self.weight_spec.element.bits > 4 or self._block_len() % 2 == 0):
                y = self._fused_frozen_product(x)
            else:
                y = linear(x, self.quantized_weight(), self.bias)
        return self._quantize_activation(y, "output")

    def extra_repr(self) -> str:
        def fmt(s):
            return "none" if s is None else f"{s.format}/b{s.block_size}{'/dyn' if s.dynamic else ''}"

        return (f"in={self.in_features}, out={self.out_features}, weight={fmt(self.weight_spec)}, "
                f"input={fmt(self.input_spec)}, output={fmt(self.output_spec)}, smooth={self.smooth is not None}, "
                f"frozen={self.frozen}")
