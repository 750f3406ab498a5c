"""Staged calibration of one decoder layer: its linear layers are calibrated group by group in the
order the forward reaches them (q/k/v, then o, then gate/up, then down), each group on inputs that
already went through the quantized groups before it (GPTQ's "true sequential" order).

Each stage runs the layer over all calibration inputs up to the next group still to calibrate.
Outputs of finished modules (a quantized linear, then a whole attention block), of the attention
function and of the norms before the next group are kept and replayed in later stages instead of
being recomputed, so the whole layer costs about one forward pass over the calibration data instead
of two (one for statistics, one for the quantized outputs) while every group sees the quantized
inputs it will see at inference.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import LeanLMError
from .kv import ATTN_NAME, KVQuantizer, attention_modules, register_attention
from .linear import QuantLinear
from .sequential import bypassed, layer_output


class _Stop(Exception):
    """Ends one calibration input's forward once the stage has what it needs."""


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


class _Budget:
    """Bytes the replay caches of one layer may hold: half the memory free when the layer starts,
    so staging never pushes a large model (streaming quantization) out of memory; past it, values
    are recomputed instead of kept."""

    def __init__(self):
        self.left = _available_bytes() // 2


def _available_bytes() -> int:
    """Memory the system can still give this process (Linux's MemAvailable; 4 GiB where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux
    return 4 << 30


class CallCache:
    """One module's outputs in call order within a stage, replayed in the stages after."""

    def __init__(self, budget: _Budget):
        self.budget, self.values, self.calls = budget, {}, 0

    def __call__(self, compute: Callable, stop_after: bool = False):
        i = self.calls
        self.calls += 1
        hit = self.values.get(i)
        # A consumer that changed a replayed tensor in place bumped its version: recompute it.
        if hit is not None and [t._version for t in _tensors(hit[0])] == hit[1]:
            return hit[0]
        out = compute()
        if stop_after:  # the call observed ranges and its output is not final: the stage ends here
            raise _Stop
        size = sum(t.numel() * t.element_size() for t in _tensors(out))
        if hit is None and size <= self.budget.left:
            self.budget.left -= size
            self.values[i] = (out, [t._version for t in _tensors(out)])
        return out

    def drop(self) -> None:
        self.budget.left += sum(t.numel() * t.element_size() for v, _ in self.values.values() for t in _tensors(v))
        self.values.clear()


class LayerStages:
    """Runs one decoder layer over its calibration inputs, stage by stage (see the module doc).

    Use as a context manager; `groups` lists the linear layers by shared input in forward order."""

    def __init__(self, layer: nn.Module, hidden, kwargs: dict, kv_method: str = "max"):
        self.layer, self.hidden, self.kwargs = layer, hidden, kwargs
        self.linears = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
        self.kvqs = [m for m in layer.modules() if isinstance(m, KVQuantizer)]
        self.kv_method = kv_method
        self.budget = _Budget()
        self.caches: list[CallCache] = []  # of wrapped modules and of attention calls
        self._forwards: dict[nn.Module, object] = {}  # a module's instance-level forward before wrapping
        self._configs: list = []
        self.done: set[str] = set()
        self._last_call: dict[nn.Module, int] = {}  # each module's last call, in forward call order
        self.groups = self._probe()

    def __enter__(self) -> "LayerStages":
        for kv in self.kvqs:
            kv.start_calibration(self.kv_method)
        for attn in attention_modules(self.layer).values():
            cfg = getattr(attn, "config", None)
            if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
                register_attention()  # the same SDPA, through a function that can replay its outputs
                cfg._attn_implementation = ATTN_NAME
                self._configs.append(cfg)
            if getattr(cfg, "_attn_implementation", None) == ATTN_NAME:
                attn.leanlm_attn_cache = CallCache(self.budget)
                self.caches.append(attn.leanlm_attn_cache)
        self._wrap_final()  # the norms before the first group
        return self

    def __exit__(self, *exc) -> None:
        for mod, prev in self._forwards.items():
            if prev is None:
                del mod.forward
            else:
                mod.forward = prev
        for attn in attention_modules(self.layer).values():
            if hasattr(attn, "leanlm_attn_cache"):
                del attn.leanlm_attn_cache
        for cfg in self._configs:
            cfg._attn_implementation = "sdpa"
        for c in self.caches:
            c.drop()
        self.caches.clear()
        if exc[0] is None:
            for kv in self.kvqs:
                if kv.observers is not None:
                    kv.finish_calibration()  # raises when the KV cache was never reached

    # -- structure ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _probe(self) -> list[list[str]]:
        """Linear layers grouped by the input tensor they share, in the order one forward calls them."""
        order: list[tuple[str, int]] = []
        held = []  # inputs stay referenced, so no later tensor can reuse an address
        calls = 0

        def hook(name):
            def fn(mod, args):
                held.append(args[0])
                order.append((name, id(args[0])))
            return fn

        def count(mod, args):
            nonlocal calls
            self._last_call[mod] = calls
            calls += 1

        handles = [m.register_forward_pre_hook(count) for m in self.layer.modules() if m is not self.layer]
        handles += [m.register_forward_pre_hook(hook(n)) for n, m in self.linears.items()]
        h = self.hidden[0]
        try:
            with bypassed(self.linears.values()), bypassed(self.kvqs):
                try:  # one sequence of the first batch is enough to see the call order
                    layer_output(self.layer, h[:1], _first_of_batch(self.kwargs, h.shape[0]))
                except (RuntimeError, ValueError, IndexError):  # some argument is not batch-first
                    order.clear()
                    self._last_call.clear()
                    layer_output(self.layer, h, self.kwargs)
        finally:
            for hd in handles:
                hd.remove()
        names = [n for n, _ in order]
        repeated = sorted({n for n in names if names.count(n) > 1})
        unreached = sorted(set(self.linears) - set(names))
        if repeated or unreached:
            if repeated:
                raise LeanLMError(f"linear layer '{repeated[0]}' runs more than once per forward of its decoder layer, "
                                  "which staged calibration cannot handle: set option staged: false")
            raise LeanLMError(f"linear layer '{unreached[0]}' never runs in its decoder layer's forward, so it cannot "
                              "be calibrated: exclude it in the recipe (exclude: [...])")
        groups: list[list[str]] = []
        for i, (name, ident) in enumerate(order):
            if i and ident == order[i - 1][1]:
                groups[-1].append(name)
            else:
                groups.append([name])
        return groups

    # -- stages -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward_all(self) -> list[torch.Tensor] | None:
        """One stage: every input through the layer (or up to a stop). Returns the layer's outputs,
        or None when KV ranges were observed on the way, after which the stage must run again with
        the cache quantized."""
        for c in self.caches:
            c.calls = 0
        outputs = []
        for h in self.hidden:
            try:
                outputs.append(layer_output(self.layer, h, self.kwargs))
            except _Stop:
                pass
        for c in self.caches:
            if c.calls == 0 and c.values:
                c.drop()  # inside a module that now replays as a whole: never read again
        observed = [kv for kv in self.kvqs if kv.observers is not None and kv.observers["k"].block_amax is not None]
        for kv in observed:
            kv.finish_calibration()
        return None if observed else outputs

    def input_stats(self, group: list[str], new: Callable[[], object]):
        """Run the stage that ends at `group`: a fresh accumulator `new()` has `add(x)` called with
        each calibration input of the group, and is returned."""
        while True:
            acc = new()

            def stop(mod, args):
                acc.add(args[0])
                raise _Stop

            handle = self.linears[group[0]].register_forward_pre_hook(stop)
            try:
                if self._forward_all() is not None:
                    return acc
            finally:
                handle.remove()

    def run_through(self, group: list[str]) -> None:
        """Run the stage that ends just after `group` has computed (its range observers see it)."""
        def stop(mod, args, out):
            raise _Stop

        while True:
            handle = self.linears[group[-1]].register_forward_hook(stop)
            try:
                if self._forward_all() is not None:
                    return
            finally:
                handle.remove()

    def finish(self, group: list[str]) -> None:
        """`group` is calibrated: from now on its outputs, those of every module whose linear layers
        are all calibrated, and those of the norms that run before the next group, are replayed."""
        self.done.update(group)
        self._wrap_final()

    def _wrap_final(self) -> None:
        """Replay every module whose outputs are final from here on."""
        todo = [self._last_call[m] for n, m in self.linears.items() if n not in self.done]
        first_todo = min(todo, default=float("inf"))
        for mod in self.layer.modules():
            if mod is self.layer or mod in self._forwards or mod not in self._last_call:
                continue
            inner = [n for n, m in self.linears.items() if m is mod or _contains(mod, m)]
            if inner and all(n in self.done for n in inner):
                self._wrap(mod)
            elif not inner and _is_norm(mod) and self._last_call[mod] < first_todo:
                # Its every call precedes the linear layers still to calibrate: its inputs, and so its
                # outputs, are final. Recomputing a norm reads the activations several times; replaying, once.
                self._wrap(mod)

    def outputs(self) -> list[torch.Tensor]:
        """The last stage: the quantized layer's outputs for every input."""
        while True:
            out = self._forward_all()
            if out is not None:
                return out

    def _wrap(self, mod: nn.Module) -> None:
        cache = CallCache(self.budget)
        self.caches.append(cache)
        self._forwards[mod] = mod.__dict__.get("forward")
        inner = mod.forward

        def forward(*args, **kwargs):
            return cache(lambda: inner(*args, **kwargs))

        mod.forward = forward


def _first_of_batch(kwargs: dict, batch: int):
    """`kwargs` with every batch-first tensor (2-D or more, leading size `batch`) cut to its first row."""
    def cut(v):
        if isinstance(v, torch.Tensor) and batch > 1 and v.dim() >= 2 and v.shape[0] == batch:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _is_norm(mod: nn.Module) -> bool:
    """A module with weights of its own and no quantizers inside (a norm): worth replaying. Weightless
    elementwise modules (activations) cost as much to recompute as to replay."""
    return (any(True for _ in mod.parameters(recurse=False))
            and not any(isinstance(m, (QuantLinear, KVQuantizer)) for m in mod.modules()))
