"""Choosing a drafter from what a user names, and comparing speculative with plain decoding."""

from __future__ import annotations

import torch

from ..engine.engine import Engine
from ..errors import LeanLMError
from .decode import speculative_generate
from .drafters import ModelDrafter, NGramDrafter, same_tokenizer
from .eagle3 import Eagle3Drafter, is_eagle3_dir, load_eagle3


class Drafting:
    """A drafter and the target engine it needs (EAGLE-3 heads need the target's hidden states).

    `draft` is ``"ngram"``, an EAGLE-3 head folder, or a draft model (built-in name or HF folder)
    sharing the target's tokenizer. Use as a context manager: it gives the target back unchanged.
    """

    def __init__(self, target, tokenizer, draft: str, max_len: int = 2048, compile: bool = True,
                 trust_remote_code: bool = False):
        self.kind = "ngram" if draft == "ngram" else None
        hidden_layers: tuple[int, ...] = ()
        if self.kind == "ngram":
            self.drafter = NGramDrafter()
        elif is_eagle3_dir(draft):
            self.kind = "eagle3"
            head = load_eagle3(draft)
            vocab = target.get_input_embeddings().num_embeddings
            if head.config.vocab_size != vocab or head.config.target_hidden_size != target.config.get_text_config().hidden_size:
                raise LeanLMError(f"EAGLE-3 head '{draft}' was trained for another target (vocabulary "
                                  f"{head.config.vocab_size}, hidden {head.config.target_hidden_size}): train one for "
                                  "this model with `leanlm speculate train`")
            hidden_layers = tuple(head.config.aux_layers)
            self.drafter = Eagle3Drafter(head, target.get_input_embeddings(), max_len=max_len, compile=compile)
        else:
            from ..models import load

            self.kind = "model"
            model, draft_tok = load(draft, trust_remote_code=trust_remote_code)
            if not same_tokenizer(tokenizer, draft_tok):
                raise LeanLMError(f"draft model '{draft}' uses a different tokenizer from the target: a draft model "
                                  "must share the target's tokenizer (or use --draft ngram / an EAGLE-3 head)")
            self.drafter = ModelDrafter(model, max_len=max_len, compile=compile,
                                        target_vocab=target.get_output_embeddings().out_features)
        self.engine = Engine(target, max_len=max_len, compile=compile, hidden_layers=hidden_layers)

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, k: int = 4, tree: bool = False, **kw):
        if tree and not hasattr(self.drafter, "propose_tree"):
            raise LeanLMError(f"a {self.kind} drafter drafts chains only: drop --tree (trees: ngram, EAGLE-3 heads)")
        return speculative_generate(self.engine, self.drafter, prompt, max_new_tokens, k=k, tree=tree, **kw)

    def close(self) -> None:
        self.engine.close()
        if isinstance(self.drafter, ModelDrafter):
            self.drafter.close()

    def __enter__(self) -> "Drafting":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compare(target, tokenizer, drafts: dict[str, str | dict], prompts: list[torch.Tensor], max_new_tokens: int = 128,
            k: int = 4, compile: bool = True, progress=None, outputs: list | None = None) -> list[dict]:
    """Greedy plain decoding vs each drafter on the same prompts; every output is checked identical.

    `drafts` maps a label to a draft (see `Drafting`), or to ``{"draft": ..., "k": ..., "tree": ...}``.

    Returns one row per variant: decode tokens/s (after the first token), end-to-end tokens/s (prefill
    included), mean acceptance length, per-position acceptance rates, decode speedup over plain
    decoding. `outputs`, if given, receives the plain greedy tokens of each prompt.
    """
    max_len = max(p.numel() for p in prompts) + max_new_tokens + k + 8
    eos = tokenizer.eos_token_id

    def run(gen_fn, warm_fn):
        warm_fn()
        outs = [gen_fn(p) for p in prompts]
        decode_s = sum(g.decode_s for g in outs)
        tps = sum(len(g.tokens) - 1 for g in outs) / decode_s if decode_s else float("nan")
        e2e = sum(len(g.tokens) for g in outs) / sum(g.ttft_s + g.decode_s for g in outs)
        return outs, tps, e2e

    with Engine(target, max_len=max_len, compile=compile) as eng:
        plain, plain_tps, plain_e2e = run(lambda p: eng.generate(p, max_new_tokens, eos_token_id=eos),
                                          lambda: eng.generate(prompts[0], 8, eos_token_id=eos))
    if outputs is not None:
        outputs.extend(g.tokens for g in plain)
    rows = [{"variant": "plain", "tokens_per_s": plain_tps, "e2e_tokens_per_s": plain_e2e, "speedup": 1.0,
             "acceptance_length": 1.0, "acceptance_rates": [], "draft_share": 0.0}]
    if progress:
        progress(rows[-1])
    for name, spec in drafts.items():
        spec = {"draft": spec} if isinstance(spec, str) else spec
        kk, tree = spec.get("k", k), spec.get("tree", False)
        with Drafting(target, tokenizer, spec["draft"], max_len=max_len + kk, compile=compile) as d:
            outs, tps, e2e = run(lambda p: d.generate(p, max_new_tokens, k=kk, tree=tree, eos_token_id=eos),
                                 lambda: d.generate(prompts[0], 2 * kk + 2, k=kk, tree=tree, eos_token_id=eos))
        for i, (a, b) in enumerate(zip(plain, outs)):
            if a.tokens != b.tokens:
                raise AssertionError(f"{name}: speculative output differs from plain greedy on prompt {i}")
        cycles = sum(o.cycles for o in outs)
        accepted = [sum(o.accepted[i] for o in outs) for i in range(kk)]
        proposed = [sum(o.proposed[i] for o in outs) for i in range(kk)]
        merged = type(outs[0])([], 0, 0.0, 0.0, cycles=cycles, accepted=accepted, proposed=proposed)
        rows.append({"variant": name, "k": kk, "tree": tree, "tokens_per_s": tps, "e2e_tokens_per_s": e2e, "speedup": tps / plain_tps,
                     "acceptance_length": merged.acceptance_length,
                     "acceptance_rates": [round(r, 3) for r in merged.acceptance_rates],
                     "draft_share": sum(o.draft_s for o in outs) / sum(o.decode_s for o in outs)})
        if progress:
            progress(rows[-1])
    return rows
