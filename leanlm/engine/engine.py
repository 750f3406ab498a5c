"""The generation engine: prefill, then a compiled decode step over a preallocated KV cache.

What transformers provides and is used as is: the model's own forward (any causal LM family whose
attention takes a 4D mask and an explicit `position_ids`: Llama, Qwen2, Gemma-3, ...), its
`StaticLayer` cache tensors, and `torch.compile`. What is written here and why:
- `generate()`' per-token Python work (logits processors, stopping criteria, cache bookkeeping,
  mask construction) costs more than the matrix products of a small model on a CPU; here a step is
  one compiled call and an argmax.
- The attention mask is built by the engine, inside the compiled step, from the cache length and
  the tokens' positions: one code path serves plain decoding, verification of several tokens,
  tree-shaped drafts (any ancestor mask) and sliding-window layers, with no recompilation per step.
- The cache (`RollbackCache`) keeps every position, so it can be rolled back to any length.
- Attention runs transformers' math ("eager") path when the model asked for SDPA: for one query
  against a few hundred cached keys, inductor fuses it, while CPU SDPA kernels cost ~0.5 ms per
  layer. Models with a quantized KV cache keep their quantizing attention.
- Linear layers read their stored weights (float, or quantized codes) in one fused pass
  (`leanlm.kernels`).
- Steps of Llama-family and Gemma-3 models (float32, bf16, INT8 and INT4 weight-only) run natively:
  a step of one token, or of a chain of up to 16 (verifying drafts, hidden states included), is one
  C++ call (`native_step`), with no compilation at all. Other models and formats, tree-shaped steps
  and prompts use the compiled or eager step; all share the cache. `native_error` says why a model
  decodes without the native step.

Compiled graphs are keyed by the number of tokens per step (1 for decoding, k+1 to verify k
drafted tokens); inductor's on-disk cache makes a second process's compile much cheaper. If
compilation fails the engine says so once and runs the same step eagerly.
"""

from __future__ import annotations

import time
import types
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import FUSED_MAX_ROWS, use_fused_linears
from .cache import RollbackCache

# Inductor inlines cheap pointwise producers into their consumers; inlined into a matrix-vector
# reduction, a normalized activation would be recomputed once per weight element. Realizing
# every buffer read more than once keeps each reduction a plain stream over the weight.
COMPILE_OPTIONS = {"realize_reads_threshold": 1}


def compile_private(fn, obj, cpp_wrapper: bool = False):
    """`fn` bound to `obj`, compiled (full graph, static shapes) with a private copy of its code.

    Guards on every parameter of a model cost milliseconds per step; the owner (an engine, a
    drafter) keeps its modules' layout for its lifetime, so they are dropped. Dynamo caches graphs
    per code object, so each owner compiles its own copy of `fn`: without module guards, another
    owner's graph would otherwise be taken for its modules.
    """
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    options = {**COMPILE_OPTIONS, "cpp_wrapper": cpp_wrapper,
               "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
    return torch.compile(types.MethodType(own, obj), fullgraph=True, dynamic=False, options=options)


@dataclass
class Generation:
    """Tokens generated after the prompt, and how long it took."""

    tokens: list[int]
    prompt_tokens: int
    ttft_s: float  # prefill + first token
    decode_s: float  # the remaining tokens
    compile_s: float = 0.0  # compilation that happened inside this call (0 once warm)
    stopped_by: str = "length"

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def _causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


class Engine:
    """Batch-1 generation for a HF causal LM (float or leanlm-quantized).

    >>> eng = Engine(model, max_len=1024)
    >>> out = eng.generate(tok("Hello", return_tensors="pt").input_ids[0], max_new_tokens=64)
    """

    def __init__(self, model: nn.Module, max_len: int = 2048, compile: bool = True, cpp_wrapper: bool = False,
                 hidden_layers: tuple[int, ...] = (), native: bool = True):
        from ..quant.linear import QuantLinear

        self.model = model.eval()
        cfg = _text_config(model)
        self.num_layers = cfg.num_hidden_layers
        types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        self.window = window if types and "sliding_attention" in types and window else None
        self.uses_mask_dict = bool(types) and self._forward_takes_mask_dict(model)
        self.max_len = max_len
        # Hidden states to keep from every step (indices into transformers' `hidden_states`: 0 is the
        # embedding output, i the output of decoder layer i-1); EAGLE-3 drafters read them.
        self.hidden_layers = tuple(hidden_layers)
        for i in self.hidden_layers:
            if not 0 <= i <= self.num_layers:
                raise ValueError(f"hidden layer {i} outside [0, {self.num_layers}]")
        self.hidden: torch.Tensor | None = None  # [tokens, len(hidden_layers) * hidden] of the last call
        self.cache = RollbackCache(self.num_layers, max_len)
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self._restore_attn = []
        for c in {id(c): c for c in (model.config, cfg)}.values():
            if getattr(c, "_attn_implementation", None) == "sdpa":
                c._attn_implementation = "eager"
                self._restore_attn.append(c)
        self._fused = use_fused_linears(model)
        self._quant_linears = [m for m in model.modules() if isinstance(m, QuantLinear) and not m.packed]
        for m in self._quant_linears:  # decode from the codes; a float copy would double memory
            m.pack()
        self.compile = compile
        if compile:  # multi-token steps (verifying drafts) use a native kernel, built once here
            from ..native import rows_linear_available

            rows_linear_available()
        # A C++ wrapper around the compiled kernels removes inductor's Python call overhead (~15%
        # faster decoding of small models) but a cold compile takes minutes on 2 cores (then cached).
        self.cpp_wrapper = cpp_wrapper
        self._compiled = None
        self._compiled_sizes: set[int] = set()
        self.compile_s = 0.0  # total compile time spent by this engine
        self.compile_error: str | None = None
        self._native = None
        self.native_error: str | None = "disabled (native=False)"
        if native:
            self._native, self.native_error = self._build_native()

    # Largest difference from the model's own logits, relative to their largest magnitude, that the
    # native step may show on the probe token. A float32 model differs in summation order only; where
    # bf16 enters (bf16 weights, or the int4/int8 kernels' bf16 activations), the eager model rounds
    # every intermediate to bf16 (~5% from float32 on SmolLM2) while the native step keeps float32.
    NATIVE_TOLERANCE = {"float32": 1e-3, "bf16": 0.2}

    def _build_native(self):
        """(decoder, None), or (None, why not). The decoder must reproduce the model's logits for a probe
        token before it is used."""
        from .native_step import Unsupported, build_decoder, check_architecture

        try:
            style = check_architecture(self.model, self.max_len)  # before paying for the probe step
            with torch.inference_mode():
                probe = torch.tensor([1])
                ref, _ = self._step(probe, torch.arange(1), _causal(1), False)  # also allocates the cache
                decoder = build_decoder(self.model, self.cache, self.max_len, style)
                got = decoder.step(1, 0)
        except Unsupported as e:
            return None, str(e)
        finally:
            self.cache.set_length(0)
        from ..quant.linear import QuantLinear

        exact = self.dtype == torch.float32 and not any(isinstance(m, QuantLinear) for m in self.model.modules())
        tol = self.NATIVE_TOLERANCE["float32" if exact else "bf16"]
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        if not err <= tol:
            warnings.warn(f"the native decode step disagrees with the model (relative error {err:.2g} > {tol}); "
                          "decoding through the compiled step", stacklevel=3)
            return None, f"probe mismatch (relative error {err:.2g})"
        return decoder, None

    @staticmethod
    def _forward_takes_mask_dict(model: nn.Module) -> bool:
        # Models with per-layer-type masks (Gemma-3, Qwen2) accept a {layer type: mask} dict.
        import inspect

        base = getattr(model, "model", model)
        try:
            src = inspect.getsource(type(base).forward)
        except (OSError, TypeError):
            return False
        return "causal_mask_mapping" in src

    def close(self) -> None:
        """Give the model back as it was (attention path, linear classes, dequantization cache)."""
        for c in self._restore_attn:
            c._attn_implementation = "sdpa"
        for m in self._fused:
            m.__class__ = nn.Linear
        for m in self._quant_linears:
            m.unpack()
        self._restore_attn, self._fused, self._quant_linears = [], [], []
        self.cache = RollbackCache(self.num_layers, self.max_len)
        self._compiled = None
        self._native, self.native_error = None, "closed"

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one step ---------------------------------------------------------------------------------
    def _mask(self, positions: torch.Tensor, tree: torch.Tensor, start: torch.Tensor):
        m = positions.shape[0]
        kv = torch.arange(self.max_len)
        rel = kv - start
        rel_c = rel.clamp(0, m - 1)
        in_block = (rel >= 0) & (rel < m)
        allowed = (kv < start)[None, :] | (in_block[None, :] & tree[:, rel_c])
        zero, neg = torch.zeros((), dtype=self.dtype), torch.tensor(torch.finfo(self.dtype).min, dtype=self.dtype)
        full = torch.where(allowed, zero, neg)[None, None]
        if not self.uses_mask_dict:
            return full
        masks = {"full_attention": full}
        if self.window is not None:
            kv_pos = torch.where(kv < start, kv, positions[rel_c])
            near = positions[:, None] - kv_pos[None, :] < self.window
            masks["sliding_attention"] = torch.where(allowed & near, zero, neg)[None, None]
        else:
            masks["sliding_attention"] = full
        return masks

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, tree: torch.Tensor, last_only: bool):
        start = self.cache.layers[0].cumulative_length
        out = self.model(input_ids=ids[None], position_ids=positions[None],
                         attention_mask=self._mask(positions, tree, start), past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1 if last_only else 0,
                         output_hidden_states=bool(self.hidden_layers))
        hidden = None
        if self.hidden_layers:
            hidden = torch.cat([out.hidden_states[i][0] for i in self.hidden_layers], -1).float()
        return out.logits[0].float(), hidden

    def _compiled_step(self, ids, positions, tree):
        if self._compiled is None:
            self._compiled = compile_private(Engine._step, self, cpp_wrapper=self.cpp_wrapper)
        m = ids.shape[0]
        first = m not in self._compiled_sizes
        t = time.perf_counter()
        try:
            out = self._compiled(ids, positions, tree, False)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same step, eagerly
            self.compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"torch.compile failed ({self.compile_error}); decoding eagerly", stacklevel=3)
            self.compile = False
            return self._step(ids, positions, tree, False)
        if first:
            self._compiled_sizes.add(m)
            self.compile_s += time.perf_counter() - t
        return out

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                tree: torch.Tensor | None = None) -> torch.Tensor:
        """Append `ids` (1D) to the cache and return their logits ``[len(ids), vocab]`` (float32).

        `positions` default to consecutive positions after the cache; `tree` is a ``[n, n]`` boolean
        mask of which new tokens each new token may attend to (default causal; for tree drafts, its
        ancestors and itself). Few tokens run the compiled step; a long prompt runs eagerly.
        """
        n = ids.shape[0]
        start = self.cache.length
        if start + n > self.max_len:
            raise ValueError(f"the engine's cache holds {self.max_len} tokens; {start} + {n} do not fit "
                             "(create the Engine with a larger max_len)")
        if positions is None and tree is None and self._native is not None and n <= FUSED_MAX_ROWS:
            logits, hidden = self._native.steps(ids.tolist(), start, list(self.hidden_layers))
            self.hidden = hidden if self.hidden_layers else None
            return logits
        if positions is None:
            positions = torch.arange(start, start + n)
        if tree is None:
            tree = _causal(n)
        if self.compile and n <= FUSED_MAX_ROWS:
            logits, self.hidden = self._compiled_step(ids, positions, tree)
        else:
            logits, self.hidden = self._step(ids, positions, tree, False)
        return logits

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence with `ids` (1D); returns the last token's logits."""
        self.cache.set_length(0)
        n = ids.shape[0]
        if n > self.max_len:
            raise ValueError(f"prompt of {n} tokens exceeds the engine's max_len {self.max_len}")
        # Eager: prompt lengths vary, and one compiled graph per length would cost more than it saves.
        logits, self.hidden = self._step(ids, torch.arange(n), _causal(n), True)
        return logits[-1]

    def rollback(self, length: int) -> None:
        """Forget every cached token from position `length` on."""
        self.cache.set_length(length)

    @property
    def length(self) -> int:
        return self.cache.length

    def fixed_sizes(self, tree: bool = False) -> bool:
        """Whether multi-token steps (of a tree, or a chain) run compiled, one graph per token count:
        then callers keep their step sizes constant."""
        return self.compile and (tree or self._native is None)

    # -- generation ---------------------------------------------------------------------------------
    def prepare(self, prompt, new_tokens: int, eos_token_id, seed):
        """Checked inputs of a generation: (1D prompt, set of stop ids, random generator or None)."""
        prompt = torch.as_tensor(prompt).reshape(-1)
        if prompt.numel() + new_tokens > self.max_len:
            raise ValueError(f"{prompt.numel()} prompt + {new_tokens} new tokens exceed the engine's max_len "
                             f"{self.max_len}: create the Engine with a larger max_len")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        return prompt, eos, (torch.Generator().manual_seed(seed) if seed is not None else None)

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, stream=None, seed: int | None = None) -> Generation:
        """Greedy (temperature 0) or sampled continuation of `prompt` (1D token ids).

        `stream(token_id)` is called for each new token as soon as it exists.
        """
        prompt, eos, gen = self.prepare(prompt, max_new_tokens, eos_token_id, seed)
        compile_before = self.compile_s
        t0 = time.perf_counter()
        logits = self.prefill(prompt)
        tokens: list[int] = []
        stopped = "length"
        t1 = None
        while len(tokens) < max_new_tokens:
            nxt = sample(logits, temperature, top_p, gen)
            tokens.append(nxt)
            if stream is not None:
                stream(nxt)
            if t1 is None:
                t1 = time.perf_counter()
            if nxt in eos:
                stopped = "eos"
                break
            if len(tokens) == max_new_tokens:
                break
            logits = self.forward(torch.tensor([nxt]))[-1]
        t2 = time.perf_counter()
        return Generation(tokens, prompt.numel(), ttft_s=(t1 or t2) - t0, decode_s=t2 - (t1 or t2),
                          compile_s=self.compile_s - compile_before, stopped_by=stopped)

    def warmup(self, sizes=(1,)) -> float:
        """Compile the step for the given token counts now (cheap when inductor's cache is warm)."""
        if not self.compile:
            return 0.0
        before = self.compile_s
        for n in sizes:
            if n <= FUSED_MAX_ROWS and self._native is not None:
                continue  # chains run natively: nothing to compile
            self.prefill(torch.zeros(1, dtype=torch.long))
            self.forward(torch.zeros(n, dtype=torch.long))
        self.rollback(0)
        return self.compile_s - before


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """Next token from one row of logits: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, temperature, top_p), 1, generator=generator))


def probabilities(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Rows of the sampling distribution: softmax at `temperature`, then nucleus (top-p) filtering."""
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
