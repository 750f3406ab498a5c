"""`quantize(model, recipe, calib=...)`: attach quantizers by recipe, calibrate layer by layer, freeze."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LeanLMError
from ..memory import release_free_memory
from .embedding import tie_quantized_embedding
from .kv import attach_kv_quantizers
from .linear import QuantLinear
from .recipes import Recipe, get_recipe

CALIB_BATCH = 8  # calibration samples per forward: big enough to keep the matmuls efficient


def attach_quantizers(model: nn.Module, recipe: Recipe) -> dict[str, QuantLinear]:
    """Swap every nn.Linear the recipe selects for a QuantLinear (fake state). Returns them by name."""
    selected = {}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        specs = recipe.layer_specs(name)
        if specs is None:
            continue
        q = QuantLinear.from_linear(module, *specs)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
        selected[name] = q
    if not selected:
        raise LeanLMError(f"recipe '{recipe.name}' selects no linear layer of this model: check its patterns")
    return selected


def check_calibratable(model: nn.Module, layers: dict[str, QuantLinear], recipe: Recipe) -> None:
    """Calibration runs inside the decoder layers: a data-driven recipe cannot select a layer outside."""
    from .sequential import decoder_layers

    inside = {id(m) for m in decoder_layers(model).modules()}
    outside = [n for n, q in layers.items() if id(q) not in inside]
    if outside:
        raise LeanLMError(f"layer '{outside[0]}' lies outside the decoder layers, where recipe '{recipe.name}' "
                          "cannot calibrate: exclude it (exclude: [...]) or use a weight-only rtn recipe")


def forward_loop_from_batches(batches: torch.Tensor, batch_size: int = CALIB_BATCH) -> Callable[[nn.Module], None]:
    """A forward_loop that runs the model over calibration token batches [N, L]."""

    def loop(model: nn.Module) -> None:
        for i in range(0, len(batches), batch_size):
            model(batches[i:i + batch_size], use_cache=False)

    return loop


def quantize(model: nn.Module, recipe, calib=None, progress: bool = True, freeze: bool = True) -> nn.Module:
    """Quantize `model` in place by `recipe` (preset name, file, dict or Recipe) and return it.

    `calib` is a `forward_loop(model)` callable or a LongTensor of calibration samples [N, L]; it is
    needed when the recipe calibrates (AWQ, GPTQ, SmoothQuant, static activations, KV cache).
    Calibration runs one decoder layer at a time on the outputs of the already-quantized layers.
    With `freeze` off the weights stay float and fake-quantized (straight-through gradients) for QAT;
    `freeze_model` turns them into codes afterwards.
    """
    from .ptq import calibrate_layer
    from .sequential import run_layerwise

    recipe = get_recipe(recipe)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise LeanLMError("model is already quantized: load the float model again and quantize that")
    if recipe.needs_data and calib is None:
        raise LeanLMError(f"recipe '{recipe.name}' calibrates on data (algorithm {'+'.join(recipe.algorithm)}, "
                          "static activation or KV ranges): pass calibration data (calib=..., CLI: --calib wiki)")
    layers = prepare_quantizers(model, recipe)
    tie_quantized_embedding(model)
    if recipe.needs_data:
        loop = calib if callable(calib) else forward_loop_from_batches(calib)
        with torch.no_grad():
            run_layerwise(model, loop, lambda layer, h, kw: calibrate_layer(layer, h, kw, recipe, freeze), progress)
    else:
        for q in tqdm(layers.values(), desc=f"quantizing ({recipe.name})", disable=not progress, unit="layer"):
            quantize_without_data(q, recipe, freeze)
    return model


def prepare_quantizers(model: nn.Module, recipe: Recipe) -> dict[str, QuantLinear]:
    """Attach the recipe's linear and KV-cache quantizers (fake state); returns the linear ones by name."""
    layers = attach_quantizers(model, recipe)
    if recipe.kv_cache is not None:
        attach_kv_quantizers(model, recipe.kv_cache)
    model.leanlm_recipe = recipe
    if recipe.needs_data:
        check_calibratable(model, layers, recipe)
    return layers


def quantize_without_data(q: QuantLinear, recipe: Recipe, freeze: bool = True) -> None:
    """A layer of a recipe that needs no data: optional MSE clipping search, then (by default) freeze."""
    from .calib import search_clip

    if recipe.options["weight_calibration"] == "mse" and q.weight_spec is not None:
        q.weight_qp = search_clip(q.weight, q.weight_spec)
    if freeze:
        q.freeze()


def freeze_model(model: nn.Module) -> nn.Module:
    """Turn every fake-quantized weight of `model` into its codes and scales (after QAT)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise LeanLMError("model has no quantized layer to freeze: quantize it first")
    for q in layers:
        q.freeze()
    return model


def pack_model(model: nn.Module) -> dict[str, int]:
    """Make every frozen quantized layer run from its codes (packed kernels, no float copies).

    Returns how many layers use each path: ``int4`` / ``int8`` / ``w8a8`` kernels, ``dequant`` (FP8,
    NVFP4, MX and layouts without a kernel: dequantized inside each forward, fused when compiled).
    """
    counts: dict[str, int] = {}
    for q in model.modules():
        if isinstance(q, QuantLinear) and q.frozen:
            kind = q.pack() or "dequant"
            counts[kind] = counts.get(kind, 0) + 1
    release_free_memory()  # the many per-layer temporaries of packing
    return counts
