"""Depth pruning: keep a subset of decoder layers and get a smaller, ordinary HF model."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import LeanLMError


def _layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise LeanLMError(f"{type(model).__name__} has no model.layers list: depth pruning supports decoder-only "
                          "HF models laid out like Llama, Qwen2 or Gemma-3")
    return layers


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A new model with only the decoder layers in `keep` (in order); config and weights follow.

    The result is a plain transformers model of the same class: `save_pretrained` writes a folder that
    `AutoModelForCausalLM.from_pretrained` loads with no leanlm code.
    """
    layers = _layers(model)
    n = len(layers)
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise LeanLMError(f"layers to keep must be a non-empty subset of 0..{n - 1}, got {keep}")
    config = copy.deepcopy(model.config)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    text.num_hidden_layers = len(keep)
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i] for i in keep]
    small = type(model)(config).to(next(model.parameters()).dtype).eval()
    rename = {f"model.layers.{i}.": f"model.layers.{j}." for j, i in enumerate(keep)}
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            prefix = ".".join(k.split(".")[:3]) + "."
            if prefix not in rename:
                continue
            k = rename[prefix] + k[len(prefix):]
        state[k] = v
    missing, unexpected = small.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise LeanLMError(f"depth pruning of {type(model).__name__} left weights unmatched "
                          f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    for i, layer in enumerate(_layers(small)):  # attention modules remember their index for the KV cache
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    small.tie_weights()
    return small
