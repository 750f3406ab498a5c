"""Calibrating one decoder layer: input statistics, then SmoothQuant / AWQ / GPTQ / clipping search,
then static activation and KV ranges, then freezing the weights into codes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .calib import RangeObserver, search_clip
from .gptq import gptq
from .kv import KVQuantizer
from .linear import QuantLinear
from .recipes import Recipe
from .sequential import bypassed, layer_output
from .smoothing import awq_scale, smoothquant_scale, smoothquant_search


@dataclass
class InputStats:
    """What the algorithms need to know about one linear layer's float inputs."""

    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    tokens: int = 0
    hessian: torch.Tensor | None = None  # sum of x^T x
    sample: list[torch.Tensor] = field(default_factory=list)  # random input rows

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.tokens, 1)


@torch.no_grad()
def collect_input_stats(layer: nn.Module, linears: dict[str, QuantLinear], hidden: list[torch.Tensor], kwargs: dict,
                        hessian: bool, sample_tokens: int,
                        keep_outputs: bool = False) -> tuple[dict[str, InputStats], list[torch.Tensor] | None]:
    """Input statistics of every linear layer over one float pass of `layer`, and (with
    `keep_outputs`) the layer's float outputs."""
    stats = {n: InputStats() for n in linears}
    # q/k/v (and gate/up) share one input tensor: one x^T x for all. Entries hold the tensor itself, so
    # its address cannot be reused by another activation while the entry lives.
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)
    per_call = max(1, sample_tokens // max(len(hidden), 1))

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            st = stats[name]
            a = x.abs()
            st.absmax = a.amax(0) if st.absmax is None else torch.maximum(st.absmax, a.amax(0))
            st.abssum = a.sum(0) if st.abssum is None else st.abssum + a.sum(0)
            st.tokens += x.shape[0]
            if hessian:
                if id(args[0]) not in shared:
                    shared[id(args[0])] = (args[0], x.T @ x)
                xtx = shared[id(args[0])][1]
                st.hessian = xtx.clone() if st.hessian is None else st.hessian + xtx
            if sample_tokens:
                idx = torch.randint(0, x.shape[0], (min(per_call, x.shape[0]),), generator=gen)
                st.sample.append(x[idx])
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


@torch.no_grad()
def calibrate_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict,
                    recipe: Recipe, freeze: bool = True) -> list[torch.Tensor] | None:
    """Calibrate every quantizer inside one decoder layer and freeze its weights (or, with `freeze`
    off, leave them float and fake-quantized for QAT). Returns the layer's outputs for the next layer:
    its float outputs when the recipe is not sequential, else those of the range pass when there was
    one (see `calibrate_ranges`), else None."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
    kvqs = [m for m in layer.modules() if isinstance(m, KVQuantizer)]
    opts = recipe.options
    data_algos = [a for a in recipe.algorithm if a != "rtn"]
    maxima, float_outputs = None, None
    # Not sequential: the float pass also hands the next layer its input, so it runs for RTN recipes too.
    if (data_algos or not opts["sequential"]) and linears:
        stats, float_outputs = collect_input_stats(
            layer, linears, hidden, kwargs, hessian=bool({"gptq", "awq"} & set(data_algos)),
            sample_tokens=opts["sample_tokens"] if _needs_sample(recipe) else 0, keep_outputs=not opts["sequential"])
        for algo in data_algos:
            for n, q in linears.items():
                _apply_algorithm(algo, q, stats[n], opts)
        maxima = {n: st.absmax for n, st in stats.items()}
        del stats  # Hessians and samples: not needed past here
    if opts["weight_calibration"] == "mse":
        for q in linears.values():
            if q.weight_spec is not None and q.weight_qp is None:
                q.weight_qp = search_clip(q.weight, q.weight_spec)
    if freeze:  # the weights are final: the range pass runs on their cached dequantization
        for q in linears.values():
            q.freeze()
    if float_outputs is not None and not kvqs and opts["act_calibration"] == "max" \
            and ranges_from_maxima(linears, maxima):
        return float_outputs
    outputs = calibrate_ranges(layer, linears.values(), kvqs, hidden, kwargs, opts["act_calibration"],
                               opts["percentile"])
    return outputs if float_outputs is None else float_outputs  # not sequential: the next layer reads float


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


def calibrate_ranges(layer, linears, kvqs, hidden, kwargs, method: str,
                     percentile: float) -> list[torch.Tensor] | None:
    """Static activation and KV ranges, observed with this layer's weights already quantized.

    The observing pass also yields the layer's outputs (quantized weights, activations still float),
    which feed the next layer: one pass instead of two, as the ranges are not known until it ends.
    Returns None when nothing needed observing.
    """
    static = [q for q in linears
              if any(s is not None and not s.dynamic for s in (q.input_spec, q.output_spec))]
    if not static and not kvqs:
        return None
    for q in static:
        q.observers = {k: RangeObserver(s, method, percentile) for k, s in
                       (("input", q.input_spec), ("output", q.output_spec)) if s is not None and not s.dynamic}
    for kv in kvqs:
        kv.start_calibration(method if method != "percentile" else "max")
    observers = {id(q): q.observers for q in static}
    try:
        outputs = [layer_output(layer, h, kwargs) for h in hidden]
    finally:
        for q in static:
            q.observers = None
    for q in static:
        for k, o in observers[id(q)].items():
            setattr(q, f"{k}_amax", o.amax())
    for kv in kvqs:
        kv.finish_calibration()
    return outputs
