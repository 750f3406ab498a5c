"""Storage encodings: grid values <-> compact tensors (4-bit codes two per byte, FP8 as float8, E8M0 as a byte)."""

from __future__ import annotations

import torch

from .formats import QParams, QuantSpec, e2m1_codes, e2m1_from_codes


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 in [0, 15]) two per byte along a flattened view, low nibble first."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)
    return out[:numel]


def encode_values(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Grid values (float32, as produced by `quantize_blocks`) to their storage tensor."""
    fmt = spec.element
    if fmt.kind == "float":
        if fmt.name == "fp4_e2m1":
            return pack_nibbles(e2m1_codes(q))
        return q.to(torch.float8_e4m3fn if fmt.name == "fp8_e4m3" else torch.float8_e5m2)
    if not spec.symmetric:  # unsigned codes
        return pack_nibbles(q.to(torch.uint8)) if fmt.bits <= 4 else q.to(torch.uint8)
    if fmt.bits <= 4:
        return pack_nibbles(q.to(torch.int8).view(torch.uint8) & 0xF)
    return q.to(torch.int8)


def _nibble_values(nib: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """4-bit codes (uint8 in [0, 15]) to float32 grid values: E2M1, two's-complement or unsigned."""
    if spec.element.kind == "float":
        return e2m1_from_codes(nib)
    if spec.symmetric:
        nib = nib.to(torch.int8) - ((nib >= 8).to(torch.int8) << 4)
    return nib.float()


def decode_values(stored: torch.Tensor, spec: QuantSpec, shape: torch.Size) -> torch.Tensor:
    """Inverse of `encode_values`: storage tensor back to float32 grid values of the blocked `shape`."""
    if spec.element.bits <= 4:
        return _nibble_values(unpack_nibbles(stored, shape.numel()), spec).reshape(shape)
    return stored.float().reshape(shape)


def decode_pairs(stored: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes as two float32 tensors of `shape`: the even- and odd-indexed elements of each block.

    Each byte holds elements 2i (low nibble) and 2i+1 (high nibble), so reading the two halves
    separately needs no interleaving: a fused kernel reads each byte once.
    """
    p = stored.reshape(shape)
    return _nibble_values(p & 0xF, spec), _nibble_values(p >> 4, spec)


def encode_qparams(qp: QParams, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Scales in their storage format: fp32, bf16, E4M3 bytes (+ fp32 global scale) or E8M0 exponent bytes."""
    out: dict[str, torch.Tensor] = {}
    if spec.scale_format == "e4m3":
        out["scale"] = qp.scale.to(torch.float8_e4m3fn)
        out["global_scale"] = qp.global_scale.reshape(1).float()
    elif spec.scale_format == "e8m0":
        out["scale"] = (torch.log2(qp.scale).round() + 127).to(torch.uint8)
    elif spec.scale_format == "bf16":
        out["scale"] = qp.scale.to(torch.bfloat16)
    else:
        out["scale"] = qp.scale.float()
    if qp.zero is not None:
        out["zero"] = qp.zero.to(torch.uint8)
    return out


def decode_qparams(t: dict[str, torch.Tensor], spec: QuantSpec) -> QParams:
    if spec.scale_format == "e8m0":
        scale = torch.exp2(t["scale"].float() - 127)
    else:
        scale = t["scale"].float()
    gs = t.get("global_scale")
    return QParams(scale, zero=None if t.get("zero") is None else t["zero"].float(),
                   global_scale=None if gs is None else gs.reshape(()).float())
