"""Number formats, granularities, scales, packing and STE of `leanlm.quant.formats`/`packing`.

Expected values are worked out by hand in the comments, never by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from leanlm.errors import LeanLMError
from leanlm.quant.formats import (
    ELEMENTS, NAMED_SPECS, QuantSpec, compute_qparams, dequantize_blocks, e2m1_codes, e2m1_from_codes,
    effective_scale, fake_quantize, quant_dequant, quantize_blocks, round_e2m1, round_to_format, storage_bits,
    to_blocks,
)
from leanlm.quant.packing import (
    decode_qparams, decode_values, encode_qparams, encode_values, pack_nibbles, unpack_nibbles,
)

T = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def assert_exact(actual, expected):
    assert torch.equal(actual, expected), f"\n got      {actual}\n expected {expected}"


# --- FP4 E2M1 -------------------------------------------------------------------------------------

def test_e2m1_grid_values_round_trip_exactly():
    """Every representable value (both signs) is a fixed point of the rounding."""
    vals = T(*GRID, *[-g for g in GRID])
    assert_exact(round_e2m1(vals), vals)
    assert_exact(round_to_format(vals, ELEMENTS["fp4_e2m1"]), vals)


def test_e2m1_ties_round_to_even_mantissa_and_negatives_mirror():
    """Midpoints go to the neighbour with an even mantissa (0, 1, 2, 4 rather than .5, 1.5, 3, 6)."""
    ties = T(0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
    expected = T(0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0)
    assert_exact(round_e2m1(ties), expected)
    assert_exact(round_e2m1(-ties), -expected)


def test_e2m1_nearest_and_saturation():
    """Off-midpoint values go to the nearest grid point; anything beyond 6 saturates to +-6."""
    x = T(0.26, 0.74, 1.3, 2.49, 2.51, 4.9, 5.1, 6.5, 7.0, 100.0, float("inf"))
    expected = T(0.5, 0.5, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0, 6.0, 6.0, 6.0)
    assert_exact(round_e2m1(x), expected)
    assert_exact(round_e2m1(-x), -expected)


def test_e2m1_codes_round_trip_all_16():
    """Code = sign << 3 | grid index; code 8 is -0, which encodes back to a zero-valued code."""
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_from_codes(codes)
    assert_exact(vals, T(*GRID, *[-g for g in GRID]))
    assert torch.signbit(vals[8]) and vals[8] == 0  # -0
    back = e2m1_codes(vals)
    keep = torch.arange(16) != 8
    assert_exact(back[keep], codes[keep])
    assert back[8].item() in (0, 8)
    assert_exact(e2m1_from_codes(back), vals)


# --- FP8 E4M3 / E5M2 ------------------------------------------------------------------------------

def test_e4m3_rounding_saturation_and_subnormals():
    """E4M3: 3 mantissa bits, max 448, smallest subnormal 2^-9; round to nearest even."""
    fmt = ELEMENTS["fp8_e4m3"]
    x = T(448.0, 460.0, 500.0, 1e6,   # at / above the max: 448
          1.0625, 1.1875, 1.07,        # step 1/8 in [1, 2): ties 1.0625 -> 1, 1.1875 -> 1.25
          272.0, 304.0,                # step 32 in [256, 448]: ties 272 -> 256, 304 -> 320
          2**-9, 2**-10, 3 * 2**-10, 2**-11)  # subnormals: 2^-10 ties to 0, 1.5 * 2^-9 ties to 2^-8
    expected = T(448.0, 448.0, 448.0, 448.0, 1.0, 1.25, 1.125, 256.0, 320.0, 2**-9, 0.0, 2**-8, 0.0)
    assert_exact(round_to_format(x, fmt), expected)
    assert_exact(round_to_format(-x, fmt), -expected)


def test_e5m2_rounding_and_saturation():
    """E5M2: 2 mantissa bits, max 57344, smallest subnormal 2^-16."""
    fmt = ELEMENTS["fp8_e5m2"]
    x = T(57344.0, 60000.0, 1.125, 1.375, 1.3, 2**-16, 2**-17)
    expected = T(57344.0, 57344.0, 1.0, 1.5, 1.25, 2**-16, 0.0)
    assert_exact(round_to_format(x, fmt), expected)
    assert_exact(round_to_format(-x, fmt), -expected)


# --- MX (E8M0) and NVFP4 (E4M3 + fp32) scales ------------------------------------------------------

def _block(amax: float, n: int = 32) -> torch.Tensor:
    b = torch.zeros(n)
    b[0], b[1] = amax, -amax / 3
    return b


def test_mx_e8m0_scale_follows_ocp_rule():
    """scale = 2^(floor(log2(amax)) - emax): emax 2 for FP4, 8 for E4M3."""
    cases = {  # amax: (mxfp4 scale, mxfp8 scale)
        6.0: (1.0, 2.0**-6),    # floor(log2 6) = 2
        7.0: (1.0, 2.0**-6),    # still 2 (7 then saturates to 6 in FP4)
        8.0: (2.0, 2.0**-5),    # 3
        0.75: (2.0**-3, 2.0**-9),  # -1
        448.0: (64.0, 1.0),     # 8
    }
    x = torch.stack([_block(a) for a in cases])
    for i, name in enumerate(("mxfp4", "mxfp8")):
        qp = compute_qparams(x, NAMED_SPECS[name])
        assert qp.global_scale is None
        assert_exact(qp.scale.reshape(-1), T(*[v[i] for v in cases.values()]))


def test_mx_scales_are_powers_of_two_and_zero_block_is_safe():
    torch.manual_seed(0)
    x = torch.randn(4, 96) * torch.logspace(-3, 3, 4)[:, None]
    x[1, 32:64] = 0  # an all-zero block
    qp = compute_qparams(x, NAMED_SPECS["mxfp4"])
    e = torch.log2(qp.scale)
    assert (qp.scale > 0).all() and torch.equal(e, e.round())
    y = quant_dequant(x, NAMED_SPECS["mxfp4"])
    assert torch.isfinite(y).all() and (y[1, 32:64] == 0).all()


def test_mx_fp4_dequantized_block():
    """amax 7 -> scale 1; values round on the E2M1 grid; 7 saturates to 6."""
    x = torch.zeros(1, 32)
    x[0, :6] = T(7.0, 3.2, -0.3, 1.1, -2.6, 0.2)
    y = quant_dequant(x, NAMED_SPECS["mxfp4"])
    expected = torch.zeros(1, 32)
    expected[0, :6] = T(6.0, 3.0, -0.5, 1.0, -3.0, 0.0)
    assert_exact(y, expected)


def test_mx_int8_scale_keeps_eight_bits():
    """MXINT8: amax 100 -> scale 2^(6 - 6) = 1, so values round to integers (error <= 0.5)."""
    spec = QuantSpec("int8", block_size=32, scale_format="e8m0")
    x = torch.zeros(1, 32)
    x[0, :4] = T(100.0, -37.3, 5.6, 0.2)
    qp = compute_qparams(x, spec)
    assert_exact(qp.scale.reshape(-1), T(1.0))
    assert_exact(quant_dequant(x, spec)[0, :4], T(100.0, -37.0, 6.0, 0.0))


def test_nvfp4_two_level_scales_and_values():
    """Block amaxes 12 and 3.3: block scales 2 and 0.55; global = 2 / 448; on E4M3: 448 and
    0.55 * 224 = 123.2 -> 120 (step 8 in [64, 128)); effective scales 2 and 120/224."""
    x = torch.zeros(1, 32)
    x[0, :6] = T(12.0, -12.0, 5.0, 2.5, 1.0, 0.2)  # / 2 -> 6, -6, 2.5->2, 1.25->1, 0.5, 0.1->0
    x[0, 16:19] = T(3.3, -1.0, 0.8)  # / (120/224) -> 6.16->6 (saturates), -1.87->-2, 1.49->1.5
    spec = NAMED_SPECS["nvfp4"]
    qp = compute_qparams(x, spec)
    torch.testing.assert_close(qp.global_scale, torch.tensor(2.0 / 448), rtol=1e-6, atol=0)
    assert_exact(qp.scale.reshape(-1), T(448.0, 120.0))
    s = 120.0 / 224.0
    expected = torch.zeros(1, 32)
    expected[0, :6] = T(12.0, -12.0, 4.0, 2.0, 1.0, 0.0)
    expected[0, 16:19] = T(6 * s, -2 * s, 1.5 * s)
    torch.testing.assert_close(quant_dequant(x, spec), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3", "int4", "int8"])
def test_e4m3_scales_with_an_all_zero_block_stay_finite(fmt):
    """A zero block (pruned or padded row) must dequantize to zeros, not NaN."""
    x = torch.zeros(2, 16)
    x[0] = torch.linspace(-3, 3, 16)
    spec = QuantSpec(fmt, block_size=16, scale_format="e4m3")
    y = quant_dequant(x, spec)
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    assert torch.isfinite(quant_dequant(torch.zeros(1, 16), spec)).all()


# --- Integers ---------------------------------------------------------------------------------------

def test_int8_symmetric_codes():
    """amax 127.5 -> scale 1 (integers map amax onto max + 1/2); round half to even: -63.5 -> -64, 2.5 -> 2;
    127.5 clips to 127."""
    spec = QuantSpec("int8")
    x = T(127.5, -63.5, 2.5, 0.4, -1.6)[None]
    qp = compute_qparams(x, spec)
    assert_exact(qp.scale.reshape(-1), T(1.0))
    assert_exact(quantize_blocks(x, spec, qp).reshape(-1), T(127.0, -64.0, 2.0, 0.0, -2.0))


def test_int4_symmetric_codes_clamp_to_minus8_plus7():
    spec = QuantSpec("int4")
    x = T(7.5, -3.5, 2.5, 0.49, -7.5)[None]  # amax 7.5 -> scale 1: +7.5 clips to 7, -7.5 rounds to -8 (even)
    assert_exact(quantize_blocks(x, spec, compute_qparams(x, spec)).reshape(-1), T(7.0, -4.0, 2.0, 0.0, -8.0))
    # calibrated amax 3.75 -> scale 0.5: 7 / 0.5 = 14 -> 7, -14 -> -8 (one more negative code), 1 -> 2
    y = T(7.0, -7.0, 1.0)[None]
    qp = compute_qparams(y, spec, amax=torch.tensor(3.75))
    assert_exact(quantize_blocks(y, spec, qp).reshape(-1), T(7.0, -8.0, 2.0))


def test_int4_asymmetric_codes():
    """Range [-5, 10] -> scale 15/15 = 1, zero point 5; codes 0..15."""
    spec = QuantSpec("int4", block_size=-1, symmetric=False)
    x = T(-5.0, 0.0, 10.0, 2.4, -0.6)[None]
    qp = compute_qparams(x, spec)
    assert_exact(qp.scale.reshape(-1), T(1.0))
    assert_exact(qp.zero.reshape(-1), T(5.0))
    assert_exact(quantize_blocks(x, spec, qp).reshape(-1), T(0.0, 5.0, 15.0, 7.0, 4.0))
    assert_exact(quant_dequant(x, spec), T(-5.0, 0.0, 10.0, 2.0, -1.0)[None])


def test_asymmetric_keeps_zero_exact():
    torch.manual_seed(1)
    x = torch.randn(6, 40) + 0.7
    x[x.abs() < 0.3] = 0.0
    for spec in (QuantSpec("int4", block_size=8, symmetric=False), QuantSpec("int8", symmetric=False)):
        assert (quant_dequant(x, spec)[x == 0] == 0).all()


@pytest.mark.parametrize("spec", [
    QuantSpec("int8"), QuantSpec("int4", block_size=16), QuantSpec("int2", block_size=8),
    QuantSpec("int8", block_size=0), QuantSpec("int4", block_size=16, symmetric=False),
    QuantSpec("int2", block_size=-1, symmetric=False),
], ids=lambda s: f"{s.format}-b{s.block_size}-{'sym' if s.symmetric else 'asym'}")
def test_int_error_at_most_half_a_step(spec):
    torch.manual_seed(2)
    x = torch.randn(7, 50)
    qp = compute_qparams(x, spec)
    step = effective_scale(qp).expand_as(to_blocks(x, spec.block_size))
    err = (to_blocks(quant_dequant(x, spec) - x, spec.block_size)).abs()
    assert (err <= step / 2 * (1 + 1e-5)).all()


# --- Granularities ----------------------------------------------------------------------------------

def test_granularities_give_the_hand_computed_scales():
    spec = QuantSpec("int4")
    x = torch.zeros(2, 8)
    x[0, 0], x[0, 4] = 7.5, 15.0
    x[1, 0], x[1, 7] = 0.75, -3.75
    scale = lambda b: compute_qparams(x, spec.with_(block_size=b)).scale  # noqa: E731
    assert_exact(scale(0), T(2.0).reshape(1, 1))  # tensor amax 15 / 7.5
    torch.testing.assert_close(scale(-1), T(2.0, 0.5).reshape(2, 1, 1))  # rows: 15, 3.75
    torch.testing.assert_close(scale(4), T(1.0, 2.0, 0.1, 0.5).reshape(2, 2, 1))  # groups: 7.5, 15, .75, 3.75


def test_partial_last_group_padding_does_not_change_scale():
    """Last dim 20, group 8: blocks of 8, 8, 4 real values + 4 zeros; the scale uses the 4 real ones."""
    torch.manual_seed(3)
    x = torch.randn(3, 20) * 5
    x[:, 16:20] = T(0.3, -0.7, 0.1, 0.2)
    for sym, expected in ((True, 0.7 / 7.5), (False, 1.0 / 15)):  # asym range [-0.7, 0.3]
        spec = QuantSpec("int4", block_size=8, symmetric=sym)
        qp = compute_qparams(x, spec)
        assert qp.scale.shape == (3, 3, 1)
        torch.testing.assert_close(qp.scale[:, 2], torch.full((3, 1), expected))
        assert quant_dequant(x, spec).shape == x.shape
    # symmetric: 0.3, -0.7, 0.1, 0.2 over the scale 0.7 / 7.5 -> codes 3, -8 (-7.5, half to even), 1, 2
    y = quant_dequant(x, QuantSpec("int4", block_size=8))
    assert_exact(y[:, 16:20], (T(3.0, -8.0, 1.0, 2.0) * (torch.tensor(0.7) / 7.5)).expand(3, 4))


@pytest.mark.parametrize("name", sorted(NAMED_SPECS))
def test_named_specs_are_idempotent(name):
    """Quantizing an already-quantized tensor again gives the same values. Integer scales map amax onto
    max + 1/2, so a block whose extreme went to -2^(b-1) gets a new scale: they reuse their scales."""
    spec = NAMED_SPECS[name]
    torch.manual_seed(4)
    x = torch.randn(5, 200)
    qp = compute_qparams(x, spec) if spec.element.kind == "int" else None
    y1 = quant_dequant(x, spec, qp)
    y2 = quant_dequant(y1, spec, qp)
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=0)


# --- Packing ----------------------------------------------------------------------------------------

def test_pack_nibbles_low_first_and_odd_counts():
    packed = pack_nibbles(torch.tensor([1, 2, 15], dtype=torch.uint8))
    assert_exact(packed, torch.tensor([0x21, 0x0F], dtype=torch.uint8))
    codes = torch.randint(0, 16, (7, 3), dtype=torch.uint8)  # 21 codes -> 11 bytes
    packed = pack_nibbles(codes)
    assert packed.numel() == 11
    assert_exact(unpack_nibbles(packed, 21), codes.reshape(-1))


STORAGE_SPECS = {**NAMED_SPECS,
                 "int4_asym": QuantSpec("int4", block_size=32, symmetric=False),
                 "int8_asym": QuantSpec("int8", symmetric=False),
                 "int2": QuantSpec("int2", block_size=16),
                 "fp8_e5m2": QuantSpec("fp8_e5m2"),
                 "int4_bf16_scales": QuantSpec("int4", block_size=64, scale_format="bf16"),
                 "int4_asym_bf16_scales": QuantSpec("int4", block_size=32, symmetric=False, scale_format="bf16")}


@pytest.mark.parametrize("name", sorted(STORAGE_SPECS))
def test_encode_decode_round_trip(name):
    """Codes and scales survive storage bit-exactly on a [5, 200] weight (200 fits no block size)."""
    spec = STORAGE_SPECS[name]
    torch.manual_seed(5)
    w = torch.randn(5, 200)
    qp = compute_qparams(w, spec)
    q = quantize_blocks(w, spec, qp)
    stored = encode_values(q, spec)
    if spec.bits == 4 or spec.format == "int2":
        assert stored.dtype == torch.uint8 and stored.numel() == math.ceil(q.numel() / 2)
    assert_exact(decode_values(stored, spec, q.shape), q)
    qp2 = decode_qparams(encode_qparams(qp, spec), spec)
    assert_exact(effective_scale(qp2), effective_scale(qp))
    if not spec.symmetric:
        assert_exact(qp2.zero, qp.zero)
    assert_exact(dequantize_blocks(q, spec, qp2, w.shape), quant_dequant(w, spec))


@pytest.mark.parametrize("symmetric", [True, False])
def test_bf16_scales_are_what_the_int4_kernel_reads(symmetric):
    """With bf16 scales the codes are chosen against the rounded scales, so PyTorch's CPU int4 kernel (bf16
    scales) holds the fake-quant weight exactly; it still rounds its input and output to bf16."""
    from leanlm.quant.linear import QuantLinear

    torch.manual_seed(0)
    spec = QuantSpec("int4", block_size=64, symmetric=symmetric, scale_format="bf16")
    qp = compute_qparams(torch.randn(32, 128), spec)
    assert_exact(qp.scale.bfloat16().float(), qp.scale)
    q = QuantLinear(128, 32, False, spec)
    torch.nn.init.normal_(q.weight)
    q.freeze()
    w = q.quantized_weight()
    assert q.weight_scale.dtype == torch.bfloat16
    assert q.pack() == "int4"
    sz = q._kernel[2]  # [G, N, 2] bf16 scales and offsets
    assert_exact(sz[..., 0].float().t(), effective_scale(q._frozen_qparams()).reshape(32, 2))
    if symmetric:
        assert not sz[..., 1].any()
    x = torch.randn(40, 128)  # many rows: the eager kernel, not a fused decode product
    ref = x.bfloat16().double() @ w.double().T
    assert ((q(x).double() - ref).abs().max() / ref.abs().max()).item() < 2**-8


# --- Storage size -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, shape, bits", [
    (NAMED_SPECS["int8"], (4, 64), 256 * 8 + 4 * 32),           # per-row fp32 scales
    (NAMED_SPECS["int4"], (4, 200), 800 * 4 + 4 * 2 * 32),      # ceil(200 / 128) = 2 groups per row
    (NAMED_SPECS["fp8"], (10, 10), 100 * 8 + 32),               # one fp32 scale
    (NAMED_SPECS["nvfp4"], (4, 32), 128 * 4 + 8 * 8 + 32),      # E4M3 block scales + fp32 global scale
    (NAMED_SPECS["mxfp4"], (4, 64), 256 * 4 + 8 * 8),           # E8M0 block scales
    (QuantSpec("int4", block_size=32, symmetric=False), (2, 64), 128 * 4 + 4 * (32 + 8)),  # + uint8 zeros
    (QuantSpec("int4", block_size=64, scale_format="bf16"), (2, 128), 256 * 4 + 4 * 16),   # bf16 scales
])
def test_storage_bits(spec, shape, bits):
    assert storage_bits(spec, torch.Size(shape)) == bits


# --- Straight-through estimator -----------------------------------------------------------------------

def _grad(x, spec, qp=None):
    x = x.clone().requires_grad_(True)
    fake_quantize(x, spec, qp).sum().backward()
    return x.grad


def test_ste_forward_equals_quant_dequant():
    torch.manual_seed(6)
    x = torch.randn(4, 64)
    for spec in NAMED_SPECS.values():
        assert_exact(fake_quantize(x, spec).detach(), quant_dequant(x, spec))


def test_ste_gradient_zero_only_where_a_calibrated_scale_clips():
    # int4, calibrated amax 0.95 -> scale 0.95 / 7; 0.95 itself is inside, 2.0 is clipped
    x = T(0.95, -0.95, 0.5, 0.0, 2.0, -1.5)[None]
    spec = QuantSpec("int4")
    assert_exact(_grad(x, spec, compute_qparams(x, spec, amax=torch.tensor(0.95))), T(1, 1, 1, 1, 0, 0)[None])
    # fp8 per-tensor, calibrated amax 1 -> scale 1/448
    spec = NAMED_SPECS["fp8"]
    x = T(-3.0, -1.0, 0.5, 1.0, 3.0)[None]
    assert_exact(_grad(x, spec, compute_qparams(x, spec, amax=torch.tensor(1.0))), T(0, 1, 1, 1, 0)[None])


def test_ste_asymmetric_gradient_zero_outside_calibrated_range():
    """Range [-2, 4] -> scale 0.4, zero 5; -3, 5 and 9 are clipped."""
    spec = QuantSpec("int4", block_size=0, symmetric=False)
    x = T(-3.0, -1.0, 0.0, 1.0, 2.0, 5.0, 9.0)[None]
    qp = compute_qparams(x, spec, amax=torch.tensor(4.0), amin=torch.tensor(-2.0))
    assert_exact(_grad(x, spec, qp), T(0, 1, 1, 1, 1, 0, 0)[None])


@pytest.mark.parametrize("spec", [QuantSpec("int4"), QuantSpec("int8", block_size=32), NAMED_SPECS["fp8"],
                                  QuantSpec("int4", block_size=32, symmetric=False)],
                         ids=["int4-row", "int8-g32", "fp8", "int4-asym"])
def test_ste_dynamic_scales_pass_every_gradient(spec):
    """With scales from the data itself nothing is clipped, block maxima included."""
    torch.manual_seed(7)
    x = torch.randn(64, 256)
    assert (_grad(x, spec) == 1).all()


# --- Validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(format="int3"),
    dict(format="int4", scale_format="fp16"),
    dict(format="fp4_e2m1", symmetric=False),
    dict(format="fp8_e4m3", symmetric=False),
    dict(format="fp4_e2m1", scale_format="e8m0"),               # per-row (-1)
    dict(format="fp4_e2m1", block_size=0, scale_format="e8m0"),  # per-tensor
    dict(format="fp4_e2m1", scale_format="e4m3"),
    dict(format="int8", block_size=-2),
])
def test_invalid_specs_raise(kwargs):
    with pytest.raises(LeanLMError):
        QuantSpec(**kwargs)


def test_with_revalidates():
    with pytest.raises(LeanLMError):
        NAMED_SPECS["int4"].with_(format="nope")


@pytest.mark.parametrize("spec", [NAMED_SPECS["nvfp4"], NAMED_SPECS["nvfp4"].with_(dynamic=True),
                                  QuantSpec("int4", block_size=64), QuantSpec("int8"), QuantSpec("int4", block_size=-1)],
                         ids=["nvfp4", "nvfp4-dynamic", "int4-g64", "int8-row", "int4-row"])
def test_fused_kernel_gives_the_bits_of_the_pytorch_ops(spec, monkeypatch):
    """The native fake-quantization kernel against the PyTorch ops it replaces: the same values, and
    gradients (plain straight-through and through the scales) equal up to summation order."""
    from leanlm.native import fake_quant_module
    from leanlm.quant import formats

    assert fake_quant_module() is not None  # a C++ compiler is part of the test environment
    g = torch.Generator().manual_seed(0)
    # Channels of very different sizes (E4M3 block scales from subnormal to large), a zero block, an outlier.
    x = torch.randn(48, 256, generator=g) * torch.rand(256, generator=g) ** 6 * 20
    x[1, :64] = 0.0
    x[2, 5] = 300.0
    grad = torch.randn(48, 256, generator=g)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(formats, "FUSED_KERNEL", fused)
        assert (formats._fused_format(x, spec) is not None) == fused
        for scale_grad in (False, True):
            xx = x.clone().requires_grad_(True)
            y = fake_quantize(xx, spec, scale_grad=scale_grad)
            y.backward(grad)
            results[fused, scale_grad] = y.detach(), xx.grad
        results[fused, "no_grad"] = quant_dequant(x, spec)
    for scale_grad in (False, True):
        (y1, g1), (y0, g0) = results[True, scale_grad], results[False, scale_grad]
        assert_exact(y1, y0)
        if scale_grad:
            torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5)
        else:
            assert_exact(g1, g0)
    assert_exact(results[True, "no_grad"], results[False, "no_grad"])
    assert not torch.equal(results[True, True][1], results[True, False][1])  # the scale term is there


def test_fused_kernel_takes_bf16_as_the_ops_do(monkeypatch):
    """bf16 inputs (autocast training) are quantized in float32 and the result cast back, as by the ops."""
    from leanlm.quant import formats

    x = (torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    spec = NAMED_SPECS["nvfp4"].with_(dynamic=True)
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(formats, "FUSED_KERNEL", fused)
        xx = x.clone().requires_grad_(True)
        y = fake_quantize(xx, spec, scale_grad=True)
        y.float().sum().backward()
        out[fused] = y, xx.grad
    assert out[True][0].dtype == out[True][1].dtype == torch.bfloat16
    assert_exact(out[True][0], out[False][0])
    # The ops take the scale term from y already rounded to bf16; the kernel from float32 y.
    torch.testing.assert_close(out[True][1], out[False][1], rtol=2e-2, atol=2e-2)
