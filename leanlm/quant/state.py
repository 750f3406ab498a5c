"""Save and restore quantized models: safetensors codes and scales plus a JSON description of each layer."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from ..errors import LeanLMError
from .formats import QuantSpec
from .embedding import TiedEmbedding
from .kv import attach_kv_quantizers
from .linear import QuantLinear
from .recipes import recipe_from_dict

STATE_FILE = "leanlm_quant.json"
FORMAT_VERSION = 1


def _spec(d):
    return None if d is None else QuantSpec(**d)


def save_quant_state(model: nn.Module, out: Path) -> Path | None:
    """Write config, weights and quantization state into `out`; None (nothing written) for a float model."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        return None
    for q in layers.values():
        q.freeze()
    model.config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))
    specs = {n: (q.weight_spec, q.input_spec, q.output_spec) for n, q in layers.items()}
    tied = isinstance(model.get_input_embeddings(), TiedEmbedding)
    return write_quant_state(out, specs, getattr(model, "leanlm_recipe", None), tied_embedding=tied)


def write_quant_state(out: Path, specs: dict[str, tuple], recipe, tied_embedding: bool = False) -> Path:
    """The JSON description of each quantized layer (weight, input, output specs) and the recipe;
    `tied_embedding`: the input embedding reads the quantized output layer (no table of its own)."""
    state = {
        "format_version": FORMAT_VERSION,
        "recipe": None if recipe is None else recipe.to_dict(),
        "tied_embedding": tied_embedding,
        "layers": {n: {k: None if s is None else asdict(s) for k, s in zip(("weight", "input", "output"), spec)}
                   for n, spec in specs.items()},
    }
    path = out / STATE_FILE
    path.write_text(json.dumps(state, indent=2))
    return path


def load_quantized(path: Path, dtype=torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model saved by `save_quant_state` without recalibrating."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {state.get('format_version')} (expected {FORMAT_VERSION})")
        layer_specs = {n: (_spec(d["weight"]), _spec(d["input"]), _spec(d.get("output")))
                       for n, d in state["layers"].items()}
        recipe = recipe_from_dict(state["recipe"], state["recipe"].get("name", "saved")) if state.get("recipe") else None
        tied = bool(state.get("tied_embedding", False))
    except (ValueError, KeyError, TypeError, LeanLMError) as e:
        raise LeanLMError(f"'{path / STATE_FILE}' is unreadable ({e}): re-run `leanlm quantize`") from None
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    # Parameters on the meta device: no float weight is ever allocated (a quantized model loads in
    # about its own size); buffers (rotary tables) are built for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name, specs in layer_specs.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise LeanLMError(f"'{path}' names layer '{name}' that the model config does not have: re-run quantize") from None
        q = QuantLinear.from_linear(lin, *specs)
        wspec = specs[0]
        if wspec is not None:
            q.allocate_frozen(dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, q)
    if recipe is not None and recipe.kv_cache is not None:
        attach_kv_quantizers(model, recipe.kv_cache)
    if tied:
        head = model.get_output_embeddings()
        if not isinstance(head, QuantLinear) or head.weight_spec is None:
            raise LeanLMError(f"'{path / STATE_FILE}' ties the embedding to an output layer it does not quantize: "
                              "re-run `leanlm quantize`")
        model.set_input_embeddings(TiedEmbedding(head, model.get_input_embeddings()))
    _materialize(model)
    out_emb = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and type(out_emb) is nn.Linear:
        out_emb.weight = model.get_input_embeddings().weight  # the meta build does not keep the tie
    _resize_buffers_to_file(model, path / "model.safetensors")
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise LeanLMError(f"'{path}' does not match its quantization state (missing {sorted(missing)[:2]}, "
                          f"unexpected {sorted(unexpected)[:2]}): re-run `leanlm quantize`")
    if recipe is not None:
        model.leanlm_recipe = recipe
    return model


def _materialize(model: nn.Module) -> None:
    """Give every meta tensor real (uninitialized) memory, keeping tied tensors tied; the file fills them."""
    real: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in real:
                    e = torch.empty(t.shape, dtype=t.dtype)
                    real[id(t)] = nn.Parameter(e, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else e
                table[key] = real[id(t)]


def _resize_buffers_to_file(model: nn.Module, file: Path) -> None:
    """Give calibrated buffers (smoothing scales, static ranges) the shapes and dtypes stored in the file,
    since load_model copies into existing tensors."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        for key in f.keys():
            owner, _, attr = key.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            if attr in mod._buffers and (mod._buffers[attr] is None or mod._buffers[attr].shape != f.get_slice(key).get_shape()):
                stored = f.get_tensor(key)
                mod._buffers[attr] = torch.empty_like(stored)
