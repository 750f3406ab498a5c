"""The engine's native single-token step for Llama-family models (leanlm/csrc/decode_step.cpp).

`build_decoder(model, cache)` hands the C++ decoder the model's own tensors (no copies, except INT4
codes, which it keeps in a layout of its own next to the kernel layout the eager path reads) and the
engine's cache, or returns the reason it cannot: another architecture, a layer format without a
native kernel (FP8, NVFP4, MX, activation or KV-cache quantization), or a CPU without AVX512-BF16.
Those models decode through the compiled step instead.
"""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2")
LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTN_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}
F32, BF16, I8, I4 = 0, 1, 2, 3


class Unsupported(Exception):
    """Why a model or layer has no native step (the engine records it and compiles instead)."""


def int4_chunk_layout(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``[N, Kp]`` (Kp a multiple of 64) to the native layout ``[N, Kp / 2]``:
    in every chunk of 64 values, byte j holds value j (low nibble) and value j + 32 (high nibble)."""
    n, kp = codes.shape
    c = codes.to(torch.uint8).reshape(n, kp // 64, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()


def native_linear(mod, m: nn.Module):
    """`m` (an nn.Linear or a packed QuantLinear) as the extension's Linear; raises Unsupported."""
    from ..kernels import unpack_int4
    from ..quant.linear import QuantLinear

    bias = None if m.bias is None else m.bias.detach().float()
    if isinstance(m, QuantLinear):
        if m.input_spec is not None or m.output_spec is not None:
            raise Unsupported("activation quantization has no native kernel")
        kernel = m._kernel if m.packed else None
        smooth = None if m.smooth is None else m.smooth.detach().float()
        if kernel is None:
            raise Unsupported(f"{m.weight_spec.format} weights have no native kernel")
        if kernel[0] == "int4":
            _, packed, sz, group = kernel
            if group % 64:
                raise Unsupported(f"int4 groups of {group} (the native kernel takes multiples of 64)")
            scale, offset = sz[..., 0].t().float(), sz[..., 1].t().float()
            w = int4_chunk_layout(unpack_int4(packed))
            return mod.Linear(I4, w, scale, offset if offset.any() else None, bias, smooth, m.in_features, group)
        if kernel[0] == "int8":
            _, w, s = kernel
            return mod.Linear(I8, w, s, None, bias, smooth, m.in_features, 0)
        raise Unsupported(f"the {kernel[0]} kernel has no native counterpart")
    if type(m) is nn.Linear or isinstance(m, nn.Linear):
        w = m.weight.detach()
        if w.dtype not in (torch.float32, torch.bfloat16):
            raise Unsupported(f"{w.dtype} linear weights")
        return mod.Linear(F32 if w.dtype == torch.float32 else BF16, w, None, None, bias, None, m.in_features, 0)
    raise Unsupported(f"{type(m).__name__} layers")


def _children(m: nn.Module) -> set[str]:
    return {name for name, _ in m.named_children()}


def check_architecture(model: nn.Module, max_len: int) -> None:
    """Raise Unsupported unless `model` is a Llama-family decoder the native step computes exactly."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in FAMILIES:
        raise Unsupported(f"model type {getattr(cfg, 'model_type', None)!r} (native: {', '.join(FAMILIES)})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {cfg.hidden_act!r}")
    window = getattr(cfg, "sliding_window", None)
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or (window and getattr(cfg, "use_sliding_window", True) and window < max_len):
        raise Unsupported("sliding-window attention")
    if getattr(cfg, "pretraining_tp", 1) != 1:
        raise Unsupported("pretraining_tp > 1")
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "rotary_emb") or not isinstance(getattr(base, "embed_tokens", None),
                                                                         nn.Embedding):
        raise Unsupported("no model.embed_tokens / model.rotary_emb")
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (attn is None or mlp is None or _children(layer) != LAYER_PARTS or _children(attn) != ATTN_PARTS
                or _children(mlp) != MLP_PARTS):
            raise Unsupported("decoder layers with other parts (extra norms, KV-cache quantizers, ...)")
        if type(mlp.act_fn).__name__ != "SiLUActivation" and not isinstance(mlp.act_fn, nn.SiLU):
            raise Unsupported(f"MLP activation {type(mlp.act_fn).__name__}")


def build_decoder(model: nn.Module, cache, max_len: int):
    """The native decoder over `model` and the engine's (initialized) `cache`; raises Unsupported."""
    from .. import native

    check_architecture(model, max_len)
    mod = native.decode_step_module()
    if isinstance(mod, str):
        raise Unsupported(mod)
    base, cfg = model.model, model.config
    attn0 = base.layers[0].self_attn
    with torch.inference_mode():
        positions = torch.arange(max_len)[None]
        cos, sin = base.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    embed = base.embed_tokens.weight.detach()
    if embed.dtype not in (torch.float32, torch.bfloat16):
        raise Unsupported(f"{embed.dtype} embeddings")
    dec = mod.Decoder(embed, base.norm.weight.detach(), native_linear(mod, model.lm_head), cos[0], sin[0],
                      float(base.norm.variance_epsilon), cfg.num_attention_heads, cfg.num_key_value_heads,
                      attn0.head_dim, float(attn0.scaling))
    for layer, c in zip(base.layers, cache.layers):
        if float(layer.input_layernorm.variance_epsilon) != float(base.norm.variance_epsilon):
            raise Unsupported("layer norms with different epsilons")
        a, f = layer.self_attn, layer.mlp
        dec.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                      *(native_linear(mod, p) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj,
                                                        f.up_proj, f.down_proj)),
                      c.keys, c.values, c.cumulative_length)
    return dec
