"""A frozen layer's weight in plain terms, for exporters: grid values, per-block scales, zero points.

Every export format stores the same numbers in its own layout; `weight_parts` decodes leanlm's
storage (padded blocks, packed nibbles, E4M3/E8M0 scales) once so exporters only re-encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LeanLMError
from ..quant.embedding import TiedEmbedding
from ..quant.formats import QuantSpec, e2m1_codes
from ..quant.kv import KVQuantizer
from ..quant.linear import QuantLinear
from ..quant.packing import decode_values


@dataclass
class WeightParts:
    """``W[n, k] = (values[n, k] - zero[n, k // block]) * scale[n, k // block] * global_scale``."""

    spec: QuantSpec
    values: torch.Tensor  # [N, K] float32 grid values: integers (signed, or unsigned when asymmetric) or minifloats
    scale: torch.Tensor  # [N, G] float32 block scales as stored (E4M3 / E8M0 decoded); [1, 1] per-tensor
    zero: torch.Tensor | None  # [N, G] float32 integer zero points (asymmetric only)
    global_scale: torch.Tensor | None  # float32 scalar (NVFP4's second-level scale)
    block: int  # values per scale along a row: a group size, K for per-row, 0 for per-tensor
    stored_scale: torch.Tensor  # [N, G] the scale tensor in its storage dtype (fp32, float8_e4m3fn, uint8 exponent)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] these parts describe (what leanlm computes with)."""
        n, k = self.values.shape
        if self.block == 0:
            s, z = self.scale.reshape(1, 1), None if self.zero is None else self.zero.reshape(1, 1)
        else:
            s = self.scale.repeat_interleave(self.block, dim=1)[:, :k]
            z = None if self.zero is None else self.zero.repeat_interleave(self.block, dim=1)[:, :k]
        v = self.values if z is None else self.values - z
        w = v * s
        return w if self.global_scale is None else w * self.global_scale


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's quantized linear layers by name, each checked to be frozen (codes, not float weights)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, q in layers.items():
        if q.weight_spec is not None and not q.frozen:
            raise LeanLMError(f"layer '{name}' is not frozen (fake-quantized float weight): call "
                              "leanlm.freeze_model(model) or save and reload the model before exporting")
    return layers


def weight_parts(q: QuantLinear) -> WeightParts:
    """Decode a frozen QuantLinear's stored weight into `WeightParts`."""
    spec = q.weight_spec
    if spec is None or not q.frozen:
        raise LeanLMError("layer has no frozen quantized weight: freeze the model before exporting")
    n, k = q.out_features, q.in_features
    shape = q._blocked_shape()
    grid = decode_values(q.codes(), spec, shape)
    qp = q._frozen_qparams()
    if spec.block_size == 0:
        values = grid.reshape(-1)[: n * k].reshape(n, k)
        block, scale = 0, qp.scale.reshape(1, 1)
        stored = q.weight_scale.reshape(1, 1)
        zero = None if qp.zero is None else qp.zero.reshape(1, 1)
    else:
        values = grid.reshape(n, -1)[:, :k]
        block = q._block_len()
        scale = qp.scale.reshape(n, -1)
        stored = q.weight_scale.reshape(n, -1)
        zero = None if qp.zero is None else qp.zero.reshape(n, -1)
    return WeightParts(spec, values.contiguous(), scale.float(), zero, qp.global_scale, block, stored)


def e2m1_bytes(values: torch.Tensor) -> torch.Tensor:
    """E2M1 grid values ``[N, K]`` (K even) -> uint8 ``[N, K / 2]``, element 2j in the low nibble."""
    codes = e2m1_codes(values)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def untie_quantized_head(model: nn.Module, config: dict) -> dict:
    """`config` (a dict) with the embedding untied when the output layer is exported quantized: that layer
    then has tensors of its own, and a loader that ties them would look for a float `lm_head.weight`."""
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear) and head.weight_spec is not None and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
    return config


def float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's float tensors under their HF names: leanlm's quantization buffers (codes, scales,
    ranges) left out, quantized layers' parameters (biases) kept, each tied tensor once, and an
    embedding tied to a quantized output layer as the dequantized table it reads."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    owners = {n for n, m in model.named_modules() if isinstance(m, (QuantLinear, KVQuantizer))}
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in owners and key not in params:
            continue
        if t.data_ptr() in seen:  # tied weights: transformers restores the tie on load
            continue
        seen.add(t.data_ptr())
        out[key] = t.detach().contiguous()
    for name, m in model.named_modules():
        if isinstance(m, TiedEmbedding):  # a table of its own in the export, equal to the output layer's
            out[f"{name}.weight"] = m.weight.contiguous()
    return out
