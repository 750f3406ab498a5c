"""Sequential calibration: one decoder layer at a time, each fed the already-quantized outputs of the
previous one, so memory stays near one layer's activations and later layers see the errors of
earlier ones (as they will at inference).

The contract with users is a `forward_loop(model)` that runs calibration data through the model.
It is called once: a hook records the inputs of the first decoder layer and stops the forward there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LeanLMError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the longest ModuleList of identical-typed modules."""
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise LeanLMError("found no stack of decoder layers in this model: calibration needs a transformer decoder")
    return best


@contextlib.contextmanager
def bypassed(modules) -> Iterator[None]:
    """Run quantizers as plain float while inside (capturing inputs, collecting statistics)."""
    modules = list(modules)
    for m in modules:
        m.bypass = True
    try:
        yield
    finally:
        for m in modules:
            m.bypass = False


class _Stop(Exception):
    pass


class _PassThrough(nn.Module):
    """Stands in for a decoder layer while the first layer's inputs are captured."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def passing_through(layers: nn.ModuleList) -> Iterator[None]:
    """Every decoder layer replaced by one that returns its input: capturing every layer's call
    arguments then costs no layer computation."""
    real = list(layers)
    for i in range(len(layers)):
        layers[i] = _PassThrough()
    try:
        yield
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one tensor [batch, seq, hidden] per forward_loop call
    kwargs: list[dict]  # per decoder layer: the keyword arguments it is called with (masks, positions)


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, forward_loop: Callable[[nn.Module], None]) -> LayerInputs:
    """Inputs of the first decoder layer for every calibration call, and each layer's call kwargs."""
    hidden: list[torch.Tensor] = []
    kwargs: list[dict | None] = [None] * len(layers)

    def record_kwargs(i):
        def hook(mod, args, kw):
            if kwargs[i] is None:
                kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            if all(k is not None for k in kwargs):  # every layer seen once: later calls stop at layer 0
                raise _Stop
        return hook

    def record_hidden(mod, args, kw):
        hidden.append((args[0] if args else kw["hidden_states"]).detach())

    handles = [layers[0].register_forward_pre_hook(record_hidden, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(record_kwargs(i), with_kwargs=True) for i, layer in enumerate(layers)]
    original_forward = model.forward

    def forward(*args, **kw):  # the stop is ours: forward_loop never sees it
        try:
            return original_forward(*args, **kw)
        except _Stop:
            return None

    model.forward = forward
    try:
        forward_loop(model)
    finally:
        del model.forward
        for h in handles:
            h.remove()
    if not hidden or any(k is None for k in kwargs):
        raise LeanLMError("forward_loop never ran the model's decoder layers: it must call model(input_ids) on data")
    return LayerInputs(hidden, kwargs)


def layer_output(layer: nn.Module, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layerwise(model: nn.Module, forward_loop: Callable[[nn.Module], None],
                  calibrate: Callable[[nn.Module, list[torch.Tensor], dict], list[torch.Tensor] | None],
                  progress: bool = True, desc: str = "calibrating layers") -> None:
    """Call `calibrate(layer, inputs, kwargs)` for each decoder layer in order, then feed the next
    layer the outputs of the calibrated (quantized) layer: those `calibrate` returns, or else a
    fresh forward of the layer."""
    from .kv import KVQuantizer
    from .linear import QuantLinear

    layers = decoder_layers(model)
    quantizers = [m for m in model.modules() if isinstance(m, (QuantLinear, KVQuantizer))]
    with bypassed(quantizers), passing_through(layers):
        inputs = capture_inputs(model, layers, forward_loop)
    hidden = inputs.hidden
    for i, layer in enumerate(tqdm(layers, desc=desc, disable=not progress, unit="layer")):
        outputs = calibrate(layer, hidden, inputs.kwargs[i])
        if i + 1 < len(layers):  # nothing calibrates on the last layer's outputs
            hidden = outputs if outputs is not None else [layer_output(layer, h, inputs.kwargs[i]) for h in hidden]
