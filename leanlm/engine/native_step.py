"""The engine's native single-token step for Llama-family and Gemma-3 models (leanlm/csrc/decode_step.cpp).

`build_decoder(model, cache, max_len, style)` hands the C++ decoder the model's own tensors (no copies, except INT4
codes, which it keeps in a layout of its own next to the kernel layout the eager path reads) and the
engine's cache, or returns the reason it cannot: another architecture, a layer format without a
native kernel (FP8, NVFP4, MX, activation or KV-cache quantization), or a CPU without AVX512-BF16.
Those models decode through the compiled step instead.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.embedding import TiedEmbedding

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
    if isinstance(m, nn.Linear):
        w = m.weight.detach()
        if w.dtype not in (torch.float32, torch.bfloat16):
            raise Unsupported(f"{w.dtype} linear weights")
        return mod.Linear(F32 if w.dtype == torch.float32 else BF16, w, None, None, bias, None, m.in_features, 0)
    raise Unsupported(f"{type(m).__name__} layers")


def _children(m: nn.Module) -> set[str]:
    return {name for name, _ in m.named_children()}


# Per style: (model types, decoder layer parts, attention parts, config activation -> native code)
STYLES = {
    "llama": (("llama", "mistral", "qwen2"), {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"},
              {"q_proj", "k_proj", "v_proj", "o_proj"}, {"silu": 0}),
    "gemma3": (("gemma3_text",), {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                                  "pre_feedforward_layernorm", "post_feedforward_layernorm"},
               {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}, {"gelu_pytorch_tanh": 1}),
}
MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}


def _style(cfg) -> str:
    kind = getattr(cfg, "model_type", None)
    for style, (types, *_) in STYLES.items():
        if kind in types:
            return style
    known = [t for types, *_ in STYLES.values() for t in types]
    raise Unsupported(f"model type {kind!r} (native: {', '.join(known)})")


def _activation(cfg, style: str) -> int:
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    codes = STYLES[style][3]
    if name not in codes:
        raise Unsupported(f"activation {name!r}")
    return codes[name]


def _windows(cfg, style: str, max_len: int) -> list[int]:
    """Each layer's sliding window (0: full attention)."""
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    if set(types) - {"full_attention", "sliding_attention"}:
        raise Unsupported(f"attention types {sorted(set(types))}")
    if style == "llama":  # the engine's mask applies layer windows for per-layer-type models only
        window = getattr(cfg, "sliding_window", None)
        if "sliding_attention" in types or (window and getattr(cfg, "use_sliding_window", True) and window < max_len):
            raise Unsupported("sliding-window attention")
        return [0] * n
    return [cfg.sliding_window if t == "sliding_attention" else 0 for t in types]


def check_architecture(model: nn.Module, max_len: int) -> str:
    """The model's style ("llama" or "gemma3"); raises Unsupported unless the native step computes it exactly."""
    cfg = model.config
    style = _style(cfg)
    _activation(cfg, style)
    _windows(cfg, style, max_len)
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, name, None) is not None:
            raise Unsupported(name.replace("_", " "))
    if getattr(cfg, "pretraining_tp", 1) != 1:
        raise Unsupported("pretraining_tp > 1")
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "rotary_emb") or not isinstance(getattr(base, "embed_tokens", None),
                                                                         (nn.Embedding, TiedEmbedding)):
        raise Unsupported("no model.embed_tokens / model.rotary_emb")
    _, layer_parts, attn_parts, _ = STYLES[style]
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (attn is None or mlp is None or _children(layer) != layer_parts or _children(attn) != attn_parts
                or _children(mlp) != MLP_PARTS):
            raise Unsupported("decoder layers with other parts (KV-cache quantizers, ...)")
    return style


def _eps(m: nn.Module) -> float | None:
    """An RMSNorm's epsilon (Llama names it `variance_epsilon`, Gemma `eps`)."""
    own = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    return None if own is None else float(own)


def _norm(m: nn.Module, style: str, eps: float) -> torch.Tensor:
    """A norm's weight as the multiplier it applies (Gemma's norms multiply by 1 + w)."""
    if _eps(m) != eps:
        raise Unsupported("norms with different epsilons")
    w = m.weight.detach().float()
    return w + 1.0 if style == "gemma3" else w


def _rotary(base: nn.Module, max_len: int, layer_type: str | None):
    with torch.inference_mode():
        x, positions = torch.zeros(1, dtype=torch.float32), torch.arange(max_len)[None]
        cos, sin = base.rotary_emb(x, positions) if layer_type is None else base.rotary_emb(x, positions, layer_type)
    return cos[0], sin[0]


def build_decoder(model: nn.Module, cache, max_len: int, style: str):
    """The native decoder over `model` (of `style`, from `check_architecture`) and the engine's
    (initialized) `cache`; raises Unsupported."""
    from .. import native

    mod = native.decode_step_module()
    if isinstance(mod, str):
        raise Unsupported(mod)
    base, cfg = model.model, model.config
    attn0 = base.layers[0].self_attn
    eps = _eps(base.norm)
    if eps is None:
        raise Unsupported("norms without an epsilon")
    head = native_linear(mod, model.lm_head)
    if isinstance(base.embed_tokens, TiedEmbedding):  # the lookups read the quantized output layer's rows
        if base.embed_tokens.head is not model.lm_head:
            raise Unsupported("an embedding tied to another layer than lm_head")
        embed, dtype = None, base.embed_tokens.head.weight_dtype
    else:
        embed = base.embed_tokens.weight.detach()
        dtype = embed.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise Unsupported(f"{dtype} embeddings")
    scale = getattr(base.embed_tokens, "embed_scale", None)  # Gemma scales embeddings, in the model's dtype
    scale = 1.0 if scale is None else float(scale.to(dtype))
    dec = mod.Decoder(embed, scale, _norm(base.norm, style, eps), head, eps,
                      cfg.num_attention_heads, cfg.num_key_value_heads, attn0.head_dim, float(attn0.scaling),
                      _activation(cfg, style))
    gemma = style == "gemma3"
    types = getattr(cfg, "layer_types", None) if gemma else None
    tables = {t: _rotary(base, max_len, t) for t in set(types or [None])}
    for i, (layer, c, window) in enumerate(zip(base.layers, cache.layers, _windows(cfg, style, max_len))):
        a, f = layer.self_attn, layer.mlp
        if float(a.scaling) != float(attn0.scaling):
            raise Unsupported("layers with different attention scalings")
        # Llama: pre-attention and pre-MLP norms. Gemma-3 adds norms after attention and the MLP, and on q/k.
        pre = [layer.input_layernorm, layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm]
        post = ([_norm(m, style, eps) for m in (layer.post_attention_layernorm, layer.post_feedforward_layernorm,
                                                a.q_norm, a.k_norm)] if gemma else [None] * 4)
        cos, sin = tables[types[i] if types else None]
        dec.add_layer(*(_norm(m, style, eps) for m in pre), *post,
                      *(native_linear(mod, p) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj,
                                                        f.up_proj, f.down_proj)),
                      c.keys, c.values, c.cumulative_length, cos, sin, window)
    return dec
