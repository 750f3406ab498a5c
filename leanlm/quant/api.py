"""`quantize(model, recipe, calib=...)`: attach quantizers by recipe, calibrate, freeze."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LeanLMError
from .linear import QuantLinear
from .recipes import Recipe, get_recipe


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


@torch.no_grad()
def calibrate_inputs(model: nn.Module, layers: dict[str, QuantLinear], forward_loop: Callable[[nn.Module], None]):
    """Max calibration of static input quantizers: run `forward_loop(model)` and record input ranges."""
    static = {n: q for n, q in layers.items() if q.input_spec is not None and not q.input_spec.dynamic}
    if not static:
        return
    from .formats import to_blocks

    amax: dict[str, torch.Tensor] = {}

    def hook(name, spec):
        def fn(mod, args):
            # Static scales cannot follow tokens: reduce over all rows, one range per block position.
            x = args[0].detach().float()
            xb = to_blocks(x.reshape(-1, x.shape[-1]), spec.block_size).abs()
            cur = xb.amax(dim=-1, keepdim=True).amax(dim=0)
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)
        return fn

    saved = {n: q.input_spec for n, q in static.items()}
    handles = [q.register_forward_pre_hook(hook(n, q.input_spec)) for n, q in static.items()]
    try:
        for q in static.values():
            q.input_spec = None  # observe float inputs
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
        for n, q in static.items():
            q.input_spec = saved[n]
    missing = [n for n in static if n not in amax]
    if missing:
        raise LeanLMError(f"calibration never reached layer '{missing[0]}': make forward_loop run the whole model")
    for n, q in static.items():
        q.input_amax = amax[n]


def forward_loop_from_batches(batches: torch.Tensor, progress: bool = True) -> Callable[[nn.Module], None]:
    """A forward_loop that runs the model over calibration token batches [N, L], one sample at a time."""

    def loop(model: nn.Module) -> None:
        for ids in tqdm(batches, desc="calibrating", disable=not progress, unit="sample"):
            model(ids.unsqueeze(0), use_cache=False)

    return loop


def quantize(model: nn.Module, recipe, calib=None, progress: bool = True) -> nn.Module:
    """Quantize `model` in place by `recipe` (preset name, file, dict or Recipe) and return it.

    `calib` is a `forward_loop(model)` callable or a LongTensor of calibration batches [N, L]; it is
    needed only when the recipe has static (calibrated) activation quantizers.
    """
    recipe = get_recipe(recipe)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise LeanLMError("model is already quantized: load the float model again and quantize that")
    layers = attach_quantizers(model, recipe)
    needs_calib = any(q.input_spec is not None and not q.input_spec.dynamic for q in layers.values())
    if needs_calib:
        if calib is None:
            raise LeanLMError(f"recipe '{recipe.name}' quantizes activations statically: pass calibration data "
                              "(--calib wiki) or use dynamic activation scales")
        loop = calib if callable(calib) else forward_loop_from_batches(calib, progress)
        calibrate_inputs(model, layers, loop)
    for q in tqdm(layers.values(), desc=f"quantizing ({recipe.name})", disable=not progress, unit="layer"):
        q.freeze()
    model.leanlm_recipe = recipe
    return model
