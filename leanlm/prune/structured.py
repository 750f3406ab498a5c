"""Structured pruning into a genuinely smaller HF model: what to keep, and the sliced model itself.

`Keep` lists, per decoder layer, the query heads, KV heads and MLP neurons to keep, plus the hidden
channels (shared by the whole residual stream) and the layers. `apply_keep` builds a fresh model of
the same class from a config with the new shape and loads the sliced weights, so the result is an
ordinary transformers model (save_pretrained / from_pretrained need no leanlm code). Every weight is
matched by name to a slicing rule; a weight with no rule refuses the architecture.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LeanLMError
from .shapes import attention_shape, check_prunable, text_config

# suffix inside a decoder layer -> (row axis, column axis); axes: heads, kv, neurons, hidden, None
LAYER_RULES = {
    "self_attn.q_proj.weight": ("heads", "hidden"), "self_attn.q_proj.bias": ("heads", None),
    "self_attn.k_proj.weight": ("kv", "hidden"), "self_attn.k_proj.bias": ("kv", None),
    "self_attn.v_proj.weight": ("kv", "hidden"), "self_attn.v_proj.bias": ("kv", None),
    "self_attn.o_proj.weight": ("hidden", "heads"), "self_attn.o_proj.bias": ("hidden", None),
    "self_attn.q_norm.weight": (None, None), "self_attn.k_norm.weight": (None, None),
    "mlp.gate_proj.weight": ("neurons", "hidden"), "mlp.up_proj.weight": ("neurons", "hidden"),
    "mlp.down_proj.weight": ("hidden", "neurons"),
    "input_layernorm.weight": ("hidden", None), "post_attention_layernorm.weight": ("hidden", None),
    "pre_feedforward_layernorm.weight": ("hidden", None), "post_feedforward_layernorm.weight": ("hidden", None),
}
TOP_RULES = {"model.embed_tokens.weight": (None, "hidden"), "model.norm.weight": ("hidden", None),
             "lm_head.weight": (None, "hidden")}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class Keep:
    """What survives pruning. Per layer lists must have the same length in every kept layer."""

    heads: list[list[int]]
    kv: list[list[int]]
    neurons: list[list[int]]
    hidden: list[int]
    layers: list[int]

    @classmethod
    def everything(cls, model: nn.Module) -> "Keep":
        n_heads, n_kv, _, hidden = attention_shape(model)
        c = text_config(model.config)
        L = c.num_hidden_layers
        return cls([list(range(n_heads))] * L, [list(range(n_kv))] * L,
                   [list(range(c.intermediate_size))] * L, list(range(hidden)), list(range(L)))


def _index(axis: str | None, keep: Keep, layer: int | None, head_dim: int) -> torch.Tensor | None:
    if axis is None:
        return None
    if axis == "hidden":
        return torch.tensor(keep.hidden)
    idx = {"heads": keep.heads, "kv": keep.kv, "neurons": keep.neurons}[axis][layer]
    idx = torch.tensor(idx)
    if axis in ("heads", "kv"):  # whole heads: head_dim rows each
        idx = (idx[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return idx


def _slice(t: torch.Tensor, rows, cols) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows)
    if cols is not None:
        t = t.index_select(1, cols)
    return t.clone()


def _check(keep: Keep, model: nn.Module) -> None:
    n_heads, n_kv, _, hidden = attention_shape(model)
    c = text_config(model.config)
    L = c.num_hidden_layers
    if not keep.layers or len(set(keep.layers)) != len(keep.layers) or not all(0 <= i < L for i in keep.layers):
        raise LeanLMError(f"layers to keep must be distinct indices in 0..{L - 1}")
    for name, per_layer, limit in (("heads", keep.heads, n_heads), ("kv", keep.kv, n_kv),
                                   ("neurons", keep.neurons, c.intermediate_size)):
        sizes = {len(per_layer[i]) for i in keep.layers}
        if len(sizes) != 1 or 0 in sizes:
            raise LeanLMError(f"every kept layer must keep the same, non-zero number of {name}")
        for i in keep.layers:
            if any(not 0 <= j < limit for j in per_layer[i]) or len(set(per_layer[i])) != len(per_layer[i]):
                raise LeanLMError(f"{name} to keep in layer {i} must be distinct indices in 0..{limit - 1}")
    group, new_kv = n_heads // n_kv, len(keep.kv[keep.layers[0]])
    for i in keep.layers:  # query heads must stay grouped by their (kept) KV head, in order
        groups = [h // group for h in keep.heads[i]]
        if groups != sorted(groups) or set(groups) != set(keep.kv[i]) or len(keep.heads[i]) % new_kv or \
                any(groups.count(g) != len(keep.heads[i]) // new_kv for g in set(groups)):
            raise LeanLMError(f"layer {i}: kept query heads must come in equal numbers from each kept KV head")
    if not keep.hidden or any(not 0 <= j < hidden for j in keep.hidden):
        raise LeanLMError(f"hidden channels to keep must be indices in 0..{hidden - 1}")


def _compensate_hidden(model: nn.Module, state: dict, shrink: float) -> None:
    """Keep activations where they were when hidden channels go.

    An RMSNorm over fewer channels divides by a root-mean-square larger by sqrt(H / H') (for channels
    that carried nothing, exactly so): every norm's gain grows by that factor to undo it. Gemma also
    multiplies embeddings by sqrt(hidden_size): its embeddings grow by the same factor, and its final
    norm (which feeds the tied output embedding) is left as it was.
    """
    r = shrink ** 0.5
    gemma = "gemma" in getattr(model.config, "model_type", "")
    for key in list(state):
        if key.endswith("layernorm.weight") or key == "model.norm.weight":
            w = state[key]
            if gemma and key == "model.norm.weight":
                continue
            state[key] = (1 + w) * r - 1 if gemma else w * r
    if gemma:
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * r


@torch.no_grad()
def apply_keep(model: nn.Module, keep: Keep) -> nn.Module:
    """A new, smaller model of the same class holding only what `keep` lists."""
    check_prunable(model)
    _check(keep, model)
    n_heads, n_kv, head_dim, hidden = attention_shape(model)
    config = copy.deepcopy(model.config)
    c = text_config(config)
    L0 = c.num_hidden_layers
    layers = sorted(keep.layers)
    first = layers[0]
    c.hidden_size = len(keep.hidden)
    c.intermediate_size = len(keep.neurons[first])
    c.num_attention_heads = len(keep.heads[first])
    c.num_key_value_heads = len(keep.kv[first])
    c.head_dim = head_dim  # explicit: some models derive it from hidden_size / heads
    c.num_hidden_layers = len(layers)
    if getattr(c, "layer_types", None):
        c.layer_types = [c.layer_types[i] for i in layers]
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m:
            i, suffix = int(m.group(1)), m.group(2)
            if suffix not in LAYER_RULES:
                raise LeanLMError(f"cannot prune {type(model).__name__}: no pruning rule for its weight '{key}'")
            if i not in new_index:
                continue
            rows, cols = (_index(a, keep, i, head_dim) for a in LAYER_RULES[suffix])
            state[f"model.layers.{new_index[i]}.{suffix}"] = _slice(value, rows, cols)
        elif key in TOP_RULES:
            rows, cols = (_index(a, keep, None, head_dim) for a in TOP_RULES[key])
            state[key] = _slice(value, rows, cols)
        else:
            raise LeanLMError(f"cannot prune {type(model).__name__}: no pruning rule for its weight '{key}'")
    tied = getattr(c, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
    if tied:  # one tensor: load it through the embedding only
        state.pop("lm_head.weight", None)
    if len(keep.hidden) != hidden:
        _compensate_hidden(model, state, hidden / len(keep.hidden))
    dtype = next(model.parameters()).dtype
    small = type(model)(config).to(dtype).eval()
    missing, unexpected = small.load_state_dict(state, strict=False)
    missing = set(missing) - ({"lm_head.weight"} if tied else set())
    if missing or unexpected:
        raise LeanLMError(f"pruning {type(model).__name__} left weights unmatched "
                          f"(missing {sorted(missing)[:3]}, unexpected {unexpected[:3]})")
    small.tie_weights()
    small.leanlm_pruned_from = {"layers": L0, "hidden": hidden, "heads": n_heads, "kv_heads": n_kv,
                                "kept_layers": layers}
    return small
