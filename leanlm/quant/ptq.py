"""Calibrating one decoder layer: input statistics, then SmoothQuant / AWQ / GPTQ / clipping search,
then static activation and KV ranges, then freezing the weights into codes."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .calib import RangeObserver, search_clip
from .gptq import gptq
from .kv import KVQuantizer
from .linear import QuantLinear
from .recipes import Recipe
from .sequential import bypassed, layer_output
from .staged import LayerStages
from .smoothing import awq_scale, smoothquant_scale, smoothquant_search


class InputStats:
    """What the algorithms need to know about one linear layer's inputs, accumulated call by call:
    per-channel max of |x|, optionally its mean (`absmean`), sum(x^T x) and `sample_per_call` random
    rows per call."""

    def __init__(self, hessian: bool = False, sample_per_call: int = 0, absmean: bool = True):
        self.absmax: torch.Tensor | None = None
        self.abssum: torch.Tensor | None = None
        self.tokens = 0
        self.hessian: torch.Tensor | None = None
        self.sample: list[torch.Tensor] = []
        self._want_hessian, self._per_call, self._want_mean = hessian, sample_per_call, absmean
        self._gen = torch.Generator().manual_seed(0)

    @property
    def absmean(self) -> torch.Tensor:
        if self.abssum is None:
            raise RuntimeError("the mean of |x| was not collected: create InputStats with absmean=True")
        return self.abssum / max(self.tokens, 1)

    def add(self, x: torch.Tensor, xtx: torch.Tensor | None = None) -> None:
        """One call's inputs; `xtx` is their x^T x when the caller already has it (shared inputs)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        a = x.abs()
        self.absmax = a.amax(0) if self.absmax is None else torch.maximum(self.absmax, a.amax(0))
        if self._want_mean:
            self.abssum = a.sum(0) if self.abssum is None else self.abssum + a.sum(0)
        self.tokens += x.shape[0]
        if self._want_hessian:
            xtx = x.T @ x if xtx is None else xtx
            self.hessian = xtx.clone() if self.hessian is None else self.hessian + xtx
        if self._per_call:
            idx = torch.randint(0, x.shape[0], (min(self._per_call, x.shape[0]),), generator=self._gen)
            self.sample.append(x[idx])


def _sample_per_call(sample_tokens: int, calls: int) -> int:
    return max(1, sample_tokens // max(calls, 1)) if sample_tokens else 0


@torch.no_grad()
def collect_input_stats(layer: nn.Module, linears: dict[str, QuantLinear], hidden: list[torch.Tensor], kwargs: dict,
                        hessian: bool, sample_tokens: int,
                        keep_outputs: bool = False) -> tuple[dict[str, InputStats], list[torch.Tensor] | None]:
    """Input statistics of every linear layer over one float pass of `layer`, and (with
    `keep_outputs`) the layer's float outputs."""
    per_call = _sample_per_call(sample_tokens, len(hidden))
    stats = {n: InputStats(hessian, per_call) for n in linears}
    # q/k/v (and gate/up) share one input tensor: one x^T x for all. Entries hold the tensor itself, so
    # its address cannot be reused by another activation while the entry lives.
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(mod, args):
            xtx = None
            if hessian:
                if id(args[0]) not in shared:
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    shared[id(args[0])] = (args[0], x.T @ x)
                xtx = shared[id(args[0])][1]
            stats[name].add(args[0], xtx)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    outputs = [] if keep_outputs else None
    try:
        with bypassed(linears.values()), bypassed(m for m in layer.modules() if isinstance(m, KVQuantizer)):
            for h in hidden:
                shared.clear()
                out = layer_output(layer, h, kwargs)
                if keep_outputs:
                    outputs.append(out)
    finally:
        for hd in handles:
            hd.remove()
    return stats, outputs


def _apply_algorithm(name: str, q: QuantLinear, st: InputStats, opts: dict) -> None:
    smooth = q.smooth if q.smooth is not None else torch.ones(q.in_features)
    if name == "smoothquant":
        if q.input_spec is not None:  # smoothing only helps where activations are quantized
            if opts["alpha"] == "search":
                s = smoothquant_search(st.absmax / smooth, q.weight, q.weight_spec, q.input_spec,
                                       torch.cat(st.sample) / smooth)
            else:
                s = smoothquant_scale(st.absmax / smooth, q.weight, float(opts["alpha"]))
            q.apply_smooth(s)
    elif name == "awq" and q.weight_spec is not None:
        # Both searches are judged on every calibration token (through E[x^T x]): judged on a sample of
        # rows, the per-block clipping choices overfit it.
        xtx = st.hessian / max(st.tokens, 1)
        q.apply_smooth(awq_scale(q.weight, q.weight_spec, st.absmean / smooth, xtx / (smooth[:, None] * smooth),
                                 opts["awq_grid"]))
        if opts["awq_clip"]:
            q.weight_qp = search_clip(q.weight, q.weight_spec, gram=xtx / (q.smooth[:, None] * q.smooth))
    elif name == "gptq" and q.weight_spec is not None:
        h = st.hessian / (smooth[:, None] * smooth[None, :])  # inputs are x / s once smoothed
        # MSE weight calibration fixes the scales GPTQ starts from (with act_order they stay fixed).
        start = search_clip(q.weight, q.weight_spec) if opts["weight_calibration"] == "mse" else None
        w, qp = gptq(q.weight, h, q.weight_spec, block=opts["gptq_block"], damp=opts["gptq_damp"],
                     act_order=opts["act_order"], qparams=start)
        with torch.no_grad():
            q.weight.copy_(w.to(q.weight.dtype))
        q.weight_qp = qp


def _needs_sample(recipe: Recipe) -> bool:
    return "smoothquant" in recipe.algorithm and recipe.options["alpha"] == "search"


def _calibrate_linears(linears: dict[str, QuantLinear], stats: dict[str, InputStats], recipe: Recipe,
                       freeze: bool) -> None:
    """The recipe's algorithms on each linear layer from its input statistics, then MSE weight
    clipping where asked, then (with `freeze`) the weights frozen into codes."""
    opts = recipe.options
    for algo in recipe.algorithm:
        if algo != "rtn":
            for n, q in linears.items():
                _apply_algorithm(algo, q, stats[n], opts)
    if opts["weight_calibration"] == "mse":
        for q in linears.values():
            if q.weight_spec is not None and q.weight_qp is None:
                q.weight_qp = search_clip(q.weight, q.weight_spec)
    if freeze:  # the weights are final: later passes run on their cached dequantization
        for q in linears.values():
            q.freeze()


@torch.no_grad()
def calibrate_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict,
                    recipe: Recipe, freeze: bool = True) -> list[torch.Tensor] | None:
    """Calibrate every quantizer inside one decoder layer and freeze its weights (or, with `freeze`
    off, leave them float and fake-quantized for QAT). Returns the layer's outputs for the next
    layer: its float outputs when the recipe is not sequential, else those of the quantized layer
    when a pass computed them, else None (the caller runs the quantized layer)."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
    opts = recipe.options
    if opts["sequential"] and _staged(opts["staged"], linears.values()):
        return _calibrate_in_stages(layer, hidden, kwargs, recipe, freeze)
    kvqs = [m for m in layer.modules() if isinstance(m, KVQuantizer)]
    stats, float_outputs = {}, None
    # One float pass for the statistics; not sequential, it also hands the next layer its input.
    if linears and ([a for a in recipe.algorithm if a != "rtn"] or not opts["sequential"]):
        stats, float_outputs = collect_input_stats(
            layer, linears, hidden, kwargs, hessian=_needs_hessian(recipe),
            sample_tokens=opts["sample_tokens"] if _needs_sample(recipe) else 0,
            keep_outputs=not opts["sequential"])
    _calibrate_linears(linears, stats, recipe, freeze)
    maxima = {n: st.absmax for n, st in stats.items()}
    del stats  # Hessians and samples: not needed past here
    if float_outputs is not None and not kvqs and opts["act_calibration"] == "max" \
            and ranges_from_maxima(linears, maxima):
        return float_outputs
    outputs = calibrate_ranges(layer, linears.values(), kvqs, hidden, kwargs, opts["act_calibration"],
                               opts["percentile"])
    return outputs if float_outputs is None else float_outputs  # not sequential: the next layer reads float


def _staged(option, linears) -> bool:
    if option == "auto":
        return any(q.input_spec is not None for q in linears)
    return option


def _kv_method(method: str) -> str:
    """The KV cache's range method: max where activations go by percentile (its observers take no percentile)."""
    return "max" if method == "percentile" else method


def _needs_hessian(recipe: Recipe) -> bool:
    return bool({"gptq", "awq"} & set(recipe.algorithm))


@torch.no_grad()
def _calibrate_in_stages(layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict, recipe: Recipe,
                         freeze: bool) -> list[torch.Tensor]:
    """Sequential calibration inside the layer too: each group of linear layers sharing an input
    (q/k/v, o, gate/up, down) is calibrated on the outputs of the groups before it, already
    quantized (see `staged`)."""
    opts = recipe.options
    method = opts["act_calibration"]
    per_call = _sample_per_call(opts["sample_tokens"] if _needs_sample(recipe) else 0, len(hidden))
    with LayerStages(layer, hidden, kwargs, kv_method=_kv_method(method)) as stages:
        for group in stages.groups:
            st = stages.input_stats(group, lambda: InputStats(_needs_hessian(recipe), per_call,
                                                              absmean="awq" in recipe.algorithm))
            linears = {n: stages.linears[n] for n in group}
            _calibrate_linears(linears, {n: st for n in group}, recipe, freeze)
            if not (method == "max" and ranges_from_maxima(linears, {n: st.absmax for n in group})):
                with observing(linears.values(), method, opts["percentile"]) as observed:
                    if observed:
                        stages.run_through(group)
            del st
            stages.finish(group)
        return stages.outputs()


def ranges_from_maxima(linears: dict[str, QuantLinear], maxima: dict[str, torch.Tensor]) -> bool:
    """Static max-calibrated input ranges straight from the float pass's per-channel maxima (exact
    for the float activations: any block's max is the max of its channels' maxima), so no range
    pass is needed. False, and nothing set, when some static range is of an output."""
    static = [(n, q) for n, q in linears.items() if q.input_spec is not None and not q.input_spec.dynamic]
    if any(q.output_spec is not None and not q.output_spec.dynamic for q in linears.values()):
        return False
    for n, q in static:
        absmax = maxima[n] if q.smooth is None else maxima[n] / q.smooth
        obs = RangeObserver(q.input_spec, "max")
        obs.observe(absmax[None, :])
        q.input_amax = obs.amax()
    return True


@contextlib.contextmanager
def observing(linears, method: str, percentile: float) -> Iterator[bool]:
    """Range observers on the static input/output quantizers of `linears` while inside (yields
    whether there are any); on a clean exit their ranges become the quantizers' static ranges."""
    static = [q for q in linears
              if any(s is not None and not s.dynamic for s in (q.input_spec, q.output_spec))]
    observers = {}
    for q in static:
        q.observers = observers[id(q)] = {k: RangeObserver(s, method, percentile) for k, s in
                                          (("input", q.input_spec), ("output", q.output_spec))
                                          if s is not None and not s.dynamic}
    try:
        yield bool(static)
    finally:
        for q in static:
            q.observers = None
    for q in static:
        for k, o in observers[id(q)].items():
            setattr(q, f"{k}_amax", o.amax())


def calibrate_ranges(layer, linears, kvqs, hidden, kwargs, method: str,
                     percentile: float) -> list[torch.Tensor] | None:
    """Static activation and KV ranges, observed with this layer's weights already quantized.

    The observing pass also yields the layer's outputs (quantized weights, activations still float).
    Returns None when nothing needed observing.
    """
    with observing(linears, method, percentile) as observed:
        if not observed and not kvqs:
            return None
        for kv in kvqs:
            kv.start_calibration(_kv_method(method))
        outputs = [layer_output(layer, h, kwargs) for h in hidden]
    for kv in kvqs:
        kv.finish_calibration()
    return outputs
