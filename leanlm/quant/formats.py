"""Number formats and one set of quantize/dequantize primitives for every granularity.

A tensor is quantized in blocks along its last dimension. The block size picks the granularity:
``0`` one block for the whole tensor (per-tensor), ``-1`` one block per row (per-channel for
weights, per-token for activations), ``k > 0`` groups of ``k`` values (padded with zeros when
the last dimension is not a multiple of ``k``, so any shape works).

Each block has a scale (and, for asymmetric integer formats, a zero point). Scales are stored
in fp32, or quantized themselves to E4M3 (NVFP4, with a second fp32 per-tensor scale) or to
E8M0 powers of two (OCP microscaling, MXFP4/MXFP8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .. import native
from ..errors import LeanLMError

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_MAX = 448.0
E5M2_MAX = 57344.0


@dataclass(frozen=True)
class ElementFormat:
    """How one value is stored: an integer of `bits` bits or a minifloat."""

    name: str
    kind: str  # "int" or "float"
    bits: int
    max: float  # largest magnitude representable (for int: the largest positive code)
    emax: int = 0  # floor(log2(max)): exponent of the largest power of two <= `max` (used by E8M0 scales)

    @property
    def range(self) -> float:
        """The magnitude a block's absolute max is scaled onto. Integers use max + 1/2: the extra negative
        code (-2^(b-1)) then serves the negative extreme and the positive one clips by at most half a
        step, the bound rounding has anyway (compressed-tensors' convention; lower error at 4 bits)."""
        return self.max + 0.5 if self.kind == "int" else self.max


ELEMENTS = {
    "int8": ElementFormat("int8", "int", 8, 127.0, emax=6),
    "int4": ElementFormat("int4", "int", 4, 7.0, emax=2),
    "int2": ElementFormat("int2", "int", 2, 1.0, emax=0),
    "fp8_e4m3": ElementFormat("fp8_e4m3", "float", 8, E4M3_MAX, emax=8),
    "fp8_e5m2": ElementFormat("fp8_e5m2", "float", 8, E5M2_MAX, emax=15),
    "fp4_e2m1": ElementFormat("fp4_e2m1", "float", 4, 6.0, emax=2),
}


SCALE_BITS = {"fp32": 32, "bf16": 16, "e4m3": 8, "e8m0": 8}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: element format, block size, scale format, symmetry, dynamism."""

    format: str
    block_size: int = -1  # 0: per-tensor, -1: per-row, k>0: groups of k along the last dim
    symmetric: bool = True
    # "fp32"; "bf16" (what PyTorch's CPU int4 kernel reads, so its results match the fake-quant model's);
    # "e4m3" (with an fp32 per-tensor scale) or "e8m0" (block formats)
    scale_format: str = "fp32"
    dynamic: bool = False  # activations: scales computed on every call instead of calibrated

    def __post_init__(self):
        if self.format not in ELEMENTS:
            raise LeanLMError(f"unknown number format '{self.format}': use one of {', '.join(ELEMENTS)}")
        if self.scale_format not in SCALE_BITS:
            raise LeanLMError(f"unknown scale format '{self.scale_format}': use {', '.join(SCALE_BITS)}")
        if not isinstance(self.block_size, int) or self.block_size < -1:
            raise LeanLMError(f"block_size {self.block_size!r} is invalid: use 0 (tensor), -1 (row) or a group size > 0")
        if not self.symmetric and self.element.kind != "int":
            raise LeanLMError(f"asymmetric quantization needs an integer format, not '{self.format}'")
        if self.scale_format in ("e4m3", "e8m0") and self.block_size <= 0:
            raise LeanLMError(f"scale format '{self.scale_format}' needs a block size > 0 (e.g. 16 or 32)")

    @property
    def element(self) -> ElementFormat:
        return ELEMENTS[self.format]

    @property
    def bits(self) -> int:
        return self.element.bits

    def with_(self, **changes) -> "QuantSpec":
        return replace(self, **changes)


# Named specs that recipes and users refer to.
NAMED_SPECS = {
    "int8": QuantSpec("int8"),
    "int4": QuantSpec("int4", block_size=128),
    "fp8": QuantSpec("fp8_e4m3", block_size=0),
    "nvfp4": QuantSpec("fp4_e2m1", block_size=16, scale_format="e4m3"),
    "mxfp4": QuantSpec("fp4_e2m1", block_size=32, scale_format="e8m0"),
    "mxfp8": QuantSpec("fp8_e4m3", block_size=32, scale_format="e8m0"),
}


# ---------------------------------------------------------------------------------------------
# Rounding to a format's grid


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value (ties to even mantissa), saturating at +-6."""
    # The grid's spacing is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]; within each binade
    # round-half-even on the step count lands ties on the even mantissa.
    mag = x.abs().clamp(max=6.0)
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)).to(x.dtype)
    return torch.copysign(torch.round(mag / step) * step, x)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit codes (sign << 3 | grid index) of values already on the E2M1 grid."""
    grid = torch.tensor(E2M1_GRID, dtype=x.dtype, device=x.device)
    idx = torch.searchsorted(grid, x.abs())
    return ((x < 0).to(torch.uint8) << 3) | idx.to(torch.uint8)


def e2m1_from_codes(codes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    grid = torch.tensor(E2M1_GRID, dtype=dtype, device=codes.device)
    vals = grid[(codes & 7).long()]
    return torch.where((codes >> 3) & 1 == 1, -vals, vals)


def round_to_format(x: torch.Tensor, fmt: ElementFormat, inplace: bool = False) -> torch.Tensor:
    """Round scaled values onto the format's representable grid (float32 in, float32 out).
    With `inplace`, integer formats overwrite `x` (a temporary: one allocation fewer per step)."""
    if fmt.kind == "int":
        if inplace:
            return x.round_().clamp_(-fmt.max - 1, fmt.max)
        return torch.round(x).clamp(-fmt.max - 1, fmt.max)
    if fmt.name == "fp4_e2m1":
        return round_e2m1(x)
    dtype = torch.float8_e4m3fn if fmt.name == "fp8_e4m3" else torch.float8_e5m2
    return x.clamp(-fmt.max, fmt.max).to(dtype).to(x.dtype)


def round_scale_e4m3(s: torch.Tensor) -> torch.Tensor:
    return s.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def round_scale_e8m0(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """OCP MX shared scale: 2^(floor(log2(amax)) - emax), clamped to E8M0's range."""
    exp = torch.floor(torch.log2(amax.clamp(min=2.0**-127))) - emax
    return torch.exp2(exp.clamp(-127, 127))


# ---------------------------------------------------------------------------------------------
# Blocking


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """View `x` as [..., n_blocks, block] along its last dim, zero-padding a partial last block."""
    if block_size == 0:
        return x.reshape(1, -1)
    k = x.shape[-1]
    b = k if block_size == -1 else block_size
    pad = (-k) % b
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, b)


def from_blocks(xb: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    k = shape[-1]
    flat = xb.reshape(*shape[:-1], -1) if len(shape) > 0 else xb.reshape(-1)
    return flat[..., :k].reshape(shape)


# ---------------------------------------------------------------------------------------------
# Scales


@dataclass
class QParams:
    """Quantization parameters of one tensor: per-block scales, zero points, and a global scale."""

    scale: torch.Tensor  # [..., n_blocks, 1]
    zero: torch.Tensor | None = None  # integer zero points, same shape as scale (asymmetric only)
    global_scale: torch.Tensor | None = None  # fp32 scalar (scale_format "e4m3")


def compute_qparams(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor | None = None,
                    amin: torch.Tensor | None = None, global_amax: torch.Tensor | None = None) -> QParams:
    """Scales (and zero points) that map each block's range onto the format's range.

    `amax`/`amin` override the observed block ranges (calibration and clipping searches pass them);
    their shape must broadcast against [..., n_blocks, 1]. `global_amax` fixes the range behind the
    per-tensor scale of two-level formats (NVFP4) when `x` is only part of the tensor.
    """
    fmt = spec.element
    xb = to_blocks(x.detach().float(), spec.block_size)
    if spec.symmetric:
        if amax is None:
            amax = xb.abs().amax(dim=-1, keepdim=True)
        amax = amax.float()
        if spec.scale_format == "e8m0":
            return QParams(round_scale_e8m0(amax, fmt.emax))
        scale = _stored(amax / fmt.range, spec)
        if spec.scale_format == "e4m3":
            # Two levels (NVFP4): an fp32 tensor scale maps the largest block scale onto E4M3's range.
            top = scale.amax() if global_amax is None else global_amax.float() / fmt.max
            gscale = _tensor_scale(top)
            # Floor at E4M3's smallest subnormal (2^-9): a zero (or underflowing) block must not get a 0 scale.
            bscale = round_scale_e4m3((scale / gscale).clamp(min=2.0**-9))
            return QParams(bscale, global_scale=gscale)
        return QParams(torch.where(scale > 0, scale, torch.ones_like(scale)))
    # Asymmetric integer: codes in [0, 2^bits - 1] with an integer zero point.
    lo = xb.amin(dim=-1, keepdim=True) if amin is None else amin.float()
    hi = xb.amax(dim=-1, keepdim=True) if amax is None else amax.float()
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # keep 0 exactly representable (padding, ReLU zeros)
    qmax = 2**fmt.bits - 1
    scale = _stored((hi - lo) / qmax, spec)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return QParams(scale, zero=zero)


def _tensor_scale(top: torch.Tensor) -> torch.Tensor:
    """NVFP4's fp32 per-tensor scale: maps the largest block scale `top` onto E4M3's range."""
    return (top / E4M3_MAX).clamp(min=1e-12)


def _stored(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Scales as a "bf16" scale format stores them (the codes are then chosen against these)."""
    return scale.to(torch.bfloat16).float() if spec.scale_format == "bf16" else scale


def effective_scale(qp: QParams) -> torch.Tensor:
    return qp.scale if qp.global_scale is None else qp.scale * qp.global_scale


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize


def qdq_with(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor | None = None):
    """Quantize-dequantize `x` with explicit (broadcastable) effective scales and zero points."""
    if spec.symmetric:
        return round_to_format(x / scale, spec.element) * scale
    qmax = 2**spec.element.bits - 1
    return (torch.round(x / scale + zero).clamp(0, qmax) - zero) * scale


def quantize_blocks(x: torch.Tensor, spec: QuantSpec, qp: QParams) -> torch.Tensor:
    """Values on the format's grid (float32, still blocked): integer codes or minifloat values."""
    xb = to_blocks(x.float(), spec.block_size)
    s = effective_scale(qp)
    if spec.symmetric:
        return round_to_format(xb / s, spec.element, inplace=True)
    qmax = 2**spec.element.bits - 1
    return (xb / s).add_(qp.zero).round_().clamp_(0, qmax)


def dequantize_blocks(q: torch.Tensor, spec: QuantSpec, qp: QParams, shape: torch.Size,
                      inplace: bool = False) -> torch.Tensor:
    """Values back from the grid; with `inplace`, into `q` (a temporary: no new allocation)."""
    s = effective_scale(qp)
    if inplace:
        xb = q.mul_(s) if spec.symmetric else q.sub_(qp.zero).mul_(s)
    else:
        xb = q * s if spec.symmetric else (q - qp.zero) * s
    return from_blocks(xb, shape)


def quant_dequant(x: torch.Tensor, spec: QuantSpec, qp: QParams | None = None) -> torch.Tensor:
    """Round trip through the format (no gradient semantics; see `fake_quantize`)."""
    if qp is None and (args := _fused_format(x, spec, build=False)) is not None:
        return _fused_forward(x, args)
    qp = qp or compute_qparams(x, spec)
    q = quantize_blocks(x, spec, qp)  # a fresh tensor: dequantized in place
    return dequantize_blocks(q, spec, qp, x.shape, inplace=True).to(x.dtype)


# The fused native kernel (leanlm/csrc/fake_quant.cpp) serves where it applies: the same bits as the
# PyTorch ops below, several times faster on CPUs. False: PyTorch ops everywhere (tests compare the two).
FUSED_KERNEL = True


def _kernel():
    return native.fake_quant_module()


def _fused_format(x: torch.Tensor, spec: QuantSpec, build: bool = True) -> tuple | None:
    """The kernel's arguments (block, range, integer max or 0 for E2M1, tensor scale or 0) for quantizing
    `x` with scales taken from itself, or None where it does not apply (it takes CPU tensors, computing in
    float32 as the ops do; symmetric E2M1 or integer elements, fp32 or NVFP4 scales, blocks dividing the
    last dim).
    Without `build`, only a kernel already built serves: training builds it (a minute, once per machine),
    one-off PTQ passes do not wait for that."""
    if not build and native.FAKE_QUANT is None:
        return None
    fmt = spec.element
    if (not FUSED_KERNEL or not x.is_floating_point() or x.device.type != "cpu" or not spec.symmetric
            or spec.block_size == 0 or spec.scale_format not in ("fp32", "e4m3") or x.numel() == 0
            or not (fmt.kind == "int" or fmt.name == "fp4_e2m1")):
        return None
    block = x.shape[-1] if spec.block_size == -1 else spec.block_size
    if x.shape[-1] % block or _kernel() is None:
        return None
    gscale = 0.0
    if spec.scale_format == "e4m3":  # as `compute_qparams`; max |x| from one pass that allocates nothing
        lo, hi = x.detach().aminmax()
        gscale = float(_tensor_scale(torch.maximum(hi, -lo).float() / fmt.range))
    return block, fmt.range, fmt.max if fmt.kind == "int" else 0.0, gscale


def _fused_forward(x: torch.Tensor, args: tuple) -> torch.Tensor:
    return _kernel().forward(x.float().contiguous(), *args).to(x.dtype)


class _FusedFakeQuant(torch.autograd.Function):
    """`_FakeQuantSTE` for scales taken from `x`, in the native kernel; the backward recomputes from `x`."""

    @staticmethod
    def forward(ctx, x, args, scale_grad):
        ctx.args, ctx.scale_grad = args, scale_grad
        ctx.save_for_backward(x)
        return _fused_forward(x, args)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gx = _kernel().backward(grad.float().contiguous(), x.float().contiguous(), *ctx.args, ctx.scale_grad)
        return gx.to(grad.dtype), None, None


class _FakeQuantSTE(torch.autograd.Function):
    """Straight-through estimator: quantized forward, identity gradient inside the clipping range.

    With `scale_grad` (symmetric formats whose scales were computed from `x` itself: dynamic
    activations, RTN weights) the gradient also follows each block's scale back to the block's
    largest magnitude, which sets it (LSQ's scale gradient, straight through the scale's own rounding):
    ``dL/d amax_b = sum_i g_i (y_i - x_i) / amax_b`` (``y_i`` alone for a clipped value). Plain STE
    treats the scale as a constant, so it cannot see that shrinking a block's outlier makes the
    block's other values round more finely.
    """

    @staticmethod
    def forward(ctx, x, spec, qp, scale_grad):
        y = quant_dequant(x, spec, qp)
        xb = to_blocks(x.detach().float(), spec.block_size)
        if spec.symmetric:
            mag = xb.abs()
            # |x| / range <= s rather than |x| <= s * range: s = amax / range, and s * range can round below amax.
            inside = mag / spec.element.range <= effective_scale(qp)
        else:
            # Codes outside [0, qmax] by more than rounding (half a step) are clipped.
            code = xb / effective_scale(qp) + qp.zero
            inside = (code >= -0.5) & (code <= 2**spec.element.bits - 0.5)
        ctx.scale_grad = scale_grad and spec.symmetric
        ctx.shape, ctx.block_size = x.shape, spec.block_size
        if ctx.scale_grad:
            amax, top = mag.max(dim=-1, keepdim=True)
            # d y_i / d s is (y_i - x_i) / s inside the range and y_i / s where clipped (LSQ); d s / d amax = s / amax
            residue = (to_blocks(y.detach().float(), spec.block_size) - xb * inside) / amax.clamp(min=1e-30)
            ctx.save_for_backward(inside, residue, top, torch.sign(xb.gather(-1, top)))
        else:
            ctx.save_for_backward(inside)
        return y

    @staticmethod
    def backward(ctx, grad):
        if not ctx.scale_grad:
            (inside,) = ctx.saved_tensors
            return grad * from_blocks(inside, ctx.shape), None, None, None
        inside, residue, top, sign = ctx.saved_tensors
        gb = to_blocks(grad.float(), ctx.block_size)
        through_scale = (gb * residue).sum(dim=-1, keepdim=True) * sign
        gx = (gb * inside).scatter_add_(-1, top, through_scale)
        return from_blocks(gx, ctx.shape).to(grad.dtype), None, None, None


def fake_quantize(x: torch.Tensor, spec: QuantSpec, qp: QParams | None = None,
                  scale_grad: bool = False) -> torch.Tensor:
    """Quantize-dequantize with straight-through gradients (for calibration-free forward and QAT).
    `scale_grad`: when the scales come from `x` (no `qp`), gradients also reach them (see `_FakeQuantSTE`)."""
    if not (torch.is_grad_enabled() and x.requires_grad):  # no backward: skip the clipping mask
        return quant_dequant(x, spec, qp)
    if qp is None and (args := _fused_format(x, spec)) is not None:
        return _FusedFakeQuant.apply(x, args, scale_grad)
    own = qp is None
    return _FakeQuantSTE.apply(x, spec, qp or compute_qparams(x, spec), scale_grad and own)


def fake_quantize_lsq(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor) -> torch.Tensor:
    """Fake quantization with a learnable effective scale per block (LSQ, symmetric formats).

    Gradients: straight through the rounding for `x` (zero where clipped) and LSQ's for `scale`
    (``q - x/s`` inside the range, ``+-range`` where clipped), scaled by 1/sqrt(numel * range) so the
    scale's step matches the weights'. The forward uses the scale as the format will store it
    (E4M3 / E8M0 rounding, NVFP4's tensor scale), so what trains is what `freeze` keeps.
    """
    if not spec.symmetric:
        raise LeanLMError(f"learned scales need a symmetric format ({spec.format} is asymmetric): "
                          "drop learn_scales or use a symmetric recipe")
    fmt = spec.element
    g = 1.0 / math.sqrt(x.numel() * fmt.range)
    s = scale * g + (scale - scale * g).detach()  # value `scale`, gradient scaled by g
    stored = effective_scale(compute_qparams(x, spec, amax=scale.detach().float() * fmt.range))
    s = s + (stored - s).detach()
    v = (to_blocks(x.float(), spec.block_size) / s).clamp(-fmt.range, fmt.range)
    q = v + (round_to_format(v.detach(), fmt) - v).detach()
    return from_blocks(q * s, x.shape).to(x.dtype)


def storage_bits(spec: QuantSpec, shape: torch.Size) -> int:
    """Bits needed to store a tensor of `shape` in `spec`: codes plus scales (and zero points)."""
    numel = math.prod(shape)
    if spec.block_size == 0:
        n_blocks = 1
    else:
        b = shape[-1] if spec.block_size == -1 else spec.block_size
        n_blocks = math.prod(shape[:-1]) * math.ceil(shape[-1] / b)
    scale_bits = SCALE_BITS[spec.scale_format]
    zero_bits = 0 if spec.symmetric else 8
    global_bits = 32 if spec.scale_format == "e4m3" else 0  # NVFP4's fp32 per-tensor scale
    return numel * spec.bits + n_blocks * (scale_bits + zero_bits) + global_bits
