"""What structured pruning needs to know about an architecture, and the refusal when it cannot."""

from __future__ import annotations

from torch import nn

from ..errors import LeanLMError

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma3")


def text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_prunable(model: nn.Module) -> None:
    kind = getattr(model.config, "model_type", "?")
    if kind not in SUPPORTED:
        raise LeanLMError(f"structured pruning does not support '{kind}' models ({type(model).__name__}): "
                          f"supported are {', '.join(SUPPORTED)}; depth and width layouts differ elsewhere")
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        raise LeanLMError("model is quantized: prune the float model, then quantize the pruned one")


def attention_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(query heads, KV heads, head dim, hidden size)."""
    c = text_config(model.config)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return heads, kv, head_dim, c.hidden_size


def non_embedding_parameters(model_or_config) -> int:
    """Decoder-layer parameters (what width and depth pruning shrink), from the config alone."""
    c = text_config(getattr(model_or_config, "config", model_or_config))
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    h, f = c.hidden_size, c.intermediate_size
    attn = h * hd * (2 * heads + 2 * kv)
    return c.num_hidden_layers * (attn + 3 * h * f)
