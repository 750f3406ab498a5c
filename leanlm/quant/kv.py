"""KV-cache quantization: keys and values are quantized as the cache would store them (after RoPE
and any key norm), through an attention implementation that wraps SDPA.

Each attention module gets a `KVQuantizer` as `module.leanlm_kv`. Static per-tensor ranges (FP8,
INT8) are calibrated; NVFP4 uses dynamic blocks of 16 along the head dimension with a calibrated
per-tensor scale, so every cached token is quantized the same way whenever it is read.
"""

from __future__ import annotations

import torch
from torch import nn

from .calib import RangeObserver
from .formats import QuantSpec, compute_qparams, fake_quantize

ATTN_NAME = "leanlm_kv_sdpa"


class KVQuantizer(nn.Module):
    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("k_amax", None)
        self.register_buffer("v_amax", None)
        self.observers: dict[str, RangeObserver] | None = None
        self.bypass = False

    def _one(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.observers is not None:
            self.observers[name].observe(x)
            return x
        amax = getattr(self, f"{name}_amax")
        if amax is None:
            raise RuntimeError("KV-cache quantizer is not calibrated: pass calibration data to quantize()")
        if self.spec.block_size == 0:
            qp = compute_qparams(x, self.spec, amax=amax)
        else:  # dynamic blocks, static per-tensor scale
            qp = compute_qparams(x, self.spec, global_amax=amax.amax())
        return fake_quantize(x, self.spec, qp)

    def forward(self, key: torch.Tensor, value: torch.Tensor):
        if self.bypass:
            return key, value
        return self._one(key, "k"), self._one(value, "v")

    def start_calibration(self, method: str = "max") -> None:
        obs_spec = self.spec if self.spec.block_size == 0 else self.spec.with_(block_size=0, scale_format="fp32")
        self.observers = {n: RangeObserver(obs_spec, method) for n in ("k", "v")}

    def finish_calibration(self) -> None:
        self.k_amax, self.v_amax = self.observers["k"].amax(), self.observers["v"].amax()
        self.observers = None


def _kv_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kvq = getattr(module, "leanlm_kv", None)

    def attend():
        k, v = (key, value) if kvq is None else kvq(key, value)
        return sdpa_attention_forward(module, query, k, v, attention_mask, **kwargs)

    replay = getattr(module, "leanlm_attn_cache", None)  # set while a layer is calibrated in stages
    if replay is None:
        return attend()
    return replay(attend, stop_after=kvq is not None and kvq.observers is not None)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _kv_sdpa)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that call the attention interface (they own q/k/v projections)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj")}


def attach_kv_quantizers(model: nn.Module, spec: QuantSpec) -> dict[str, KVQuantizer]:
    register_attention()
    found = {}
    for name, attn in attention_modules(model).items():
        attn.leanlm_kv = KVQuantizer(spec)
        found[name] = attn.leanlm_kv
    if not found:
        from ..errors import LeanLMError

        raise LeanLMError("KV-cache quantization found no attention module with k_proj/v_proj in this model")
    for cfg in {id(c): c for c in (model.config, getattr(model.config, "text_config", None)) if c is not None}.values():
        cfg._attn_implementation = ATTN_NAME
    return found
