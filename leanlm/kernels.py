"""Linear layers for decoding: one fused pass over the stored weight.

At batch 1 a decoder is a chain of matrix-vector products and reads every weight once per token.
On CPU, MKL/oneDNN's GEMV reaches about a third of the machine's read bandwidth on these shapes
(bench/decode.py prints both), and a quantized weight must first be dequantized into a float copy.
Inside `torch.compile`, the same product written as a multiply-reduce lets inductor emit one
vectorized loop that reads the stored codes (int8, packed int4, fp8, e2m1 + scales), dequantizes in
registers and accumulates in float32: near the bandwidth limit, and without a float copy of the
weight. Outside compiled code (eager, prefill with many rows) it is plain `F.linear`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import native

# Rows up to which the fused reduction beats a dequantize + GEMM (verification of short drafts).
FUSED_MAX_ROWS = 16


def few_rows(x: torch.Tensor) -> bool:
    """True when `x` (``[..., K]``) has at most `FUSED_MAX_ROWS` rows: a decode or verification step."""
    return x.numel() // x.shape[-1] <= FUSED_MAX_ROWS


def fused_rows(x: torch.Tensor) -> bool:
    """True when `x @ w.T` should be written as the fused reduction (compiling, few rows)."""
    return torch.compiler.is_compiling() and few_rows(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; `weight` may be an expression (a dequantization) that inductor fuses."""
    if not fused_rows(x):
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    rows = x.numel() // x.shape[-1]
    if (rows > 1 and native.ROWS_LINEAR and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.is_contiguous()):
        # Several rows (verifying drafted tokens): inductor's reduction would read the weight once
        # per row; the native kernel reads it once for all of them.
        y = native.rows_linear(x.reshape(rows, -1).float(), weight).reshape(*x.shape[:-1], -1)
    else:
        y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class FusedLinear(nn.Linear):
    """An `nn.Linear` whose compiled decode path is the fused reduction (same parameters, same state dict).

    The engine switches a model's `nn.Linear` modules to this class in place (`use_fused_linears`);
    eager results are bit-identical to `nn.Linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_fused_linears(model: nn.Module) -> list[nn.Linear]:
    """Switch every plain `nn.Linear` of `model` to `FusedLinear`; returns the switched modules."""
    switched = [m for m in model.modules() if type(m) is nn.Linear]
    for m in switched:
        m.__class__ = FusedLinear
    return switched


# -- INT4 groups: PyTorch's CPU int4 kernel ---------------------------------------------------------
# For 4-bit codes inductor's generated loops cost far more per byte than the read (nibble unpacking
# on byte vectors); PyTorch's tinygemm CPU kernel does it in hand-written SIMD. It wants bf16
# activations, groups of 32..256 dividing K (partial groups are padded) and N a multiple of 16.
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def int4_kernel_fits(out_features: int, group: int) -> bool:
    return group in INT4_KERNEL_GROUPS and out_features % 16 == 0


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes ``[N, K]`` (0..15, K a multiple of the group) with ``w = (q - 8) * scale + zero``
    per group (``[N, G]``) to the kernel's packed weight and ``[G, N, 2]`` bf16 scales-and-zeros."""
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


@functools.lru_cache(maxsize=8)
def _int4_layout(n: int, k: int) -> torch.Tensor:
    """For each nibble of the kernel's packed ``[n, k / 2]`` weight, the flat index of the code it holds.

    The CPU layout is a fixed permutation of positions; it is read off by packing the indices
    themselves, four bits at a time, so no assumption about the layout is needed.
    """
    src = torch.arange(n * k, dtype=torch.int64)
    where = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(4, (n * k - 1).bit_length()), 4):
        digits = ((src >> shift) & 0xF).reshape(n, k).to(torch.int32)
        p = torch._convert_weight_to_int4pack_for_cpu(digits, 2)
        where |= torch.stack([p & 0xF, p >> 4], -1).reshape(-1).to(torch.int64) << shift
    return where.to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of the kernel packing in `pack_int4`: unsigned codes ``[N, K]`` (uint8, 0..15)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    nibbles = torch.stack([packed & 0xF, packed >> 4], -1).reshape(-1)
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[_int4_layout(n, k).long()] = nibbles
    return codes.reshape(n, k)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    k_pad = packed.shape[1] * 2
    lead = x.shape[:-1]
    x2 = torch.nn.functional.pad(x.reshape(-1, x.shape[-1]), (0, k_pad - x.shape[-1])).to(torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(x2, packed, group, scales_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, -1).to(x.dtype)


# -- INT8 weights: PyTorch's CPU int8 kernels -------------------------------------------------------
# Weight-only: `_weight_int8pack_mm` (bf16 activations; ~2.5x faster than a float GEMV per byte here).
# W8A8: `_int_mm` (int8 x int8 -> int32) with the activation quantized per token or per tensor.


def int8_kernel_fits(in_features: int) -> bool:
    # `_weight_int8pack_mm` reads K in steps of 16 and returns wrong sums (or crashes) otherwise.
    return in_features % 16 == 0


_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")  # read once: compiled code cannot ask


def int8_fused_is_fast() -> bool:
    """Whether compiled decode steps should use inductor's fused int8 reduction rather than `int8_linear`.

    On AVX-512 the fused loop is 1.5x faster than `_weight_int8pack_mm`. On AVX2 (AMD Zen 1, 576 x 1536
    at batch 1) it took 1.35 ms against float32's 0.24 ms, so there `int8_linear` runs instead: the
    native AVX2 kernel (0.16 ms), or without a compiler `_weight_int8pack_mm` (0.35 ms) as an op that
    inductor leaves alone.
    """
    return _AVX512


def _int8_weight_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    ones = torch.ones(weight.shape[0], dtype=torch.bfloat16)
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), weight, ones).float()


_int8_weight_mm_op = torch.library.custom_op("leanlm::int8_weight_mm", _int8_weight_mm, mutates_args=())
_int8_weight_mm_op.register_fake(lambda x, weight: x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32))


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T`` for int8 ``weight [N, K]`` and fp32 per-row ``scale [N]``.

    The kernel takes bf16 scales; rounding them would bias whole output channels, so it runs with unit
    scales and the fp32 ones are applied to its output. Inside torch.compile it runs as an opaque op
    (inductor would otherwise lower it into its own, slower loops). Where the fused loop is slow (AVX2),
    few rows go through the native kernel with float32 activations instead, if it is built."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not int8_fused_is_fast() and native.ROWS_LINEAR and few_rows(x):
        y = native.rows_linear(x2.float(), weight) * scale  # float32 activations, AVX2 dot products
    else:
        mm = _int8_weight_mm_op if torch.compiler.is_compiling() else _int8_weight_mm
        y = mm(x2, weight) * scale
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, -1).to(x.dtype)


def w8a8_linear(xq: torch.Tensor, x_scale: torch.Tensor, weight_t: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """int8 activations ``xq [..., K]`` (scale per token ``[..., 1]`` or one) times int8 ``weight_t [K, N]``
    (scale per output channel ``[N]``): exact int32 accumulation, one float rescale."""
    lead = xq.shape[:-1]
    acc = torch._int_mm(xq.reshape(-1, xq.shape[-1]), weight_t).reshape(*lead, -1)
    y = acc.float() * x_scale.float() * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)
