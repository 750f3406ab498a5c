"""Speculative decoding: a drafter proposes tokens, the target verifies them all in one step.

One function, `speculative_generate`, serves every drafter (`leanlm.speculative.drafters`). Each
cycle the target runs once over its last token plus the k drafted ones (the engine's compiled
multi-token step), keeps the longest prefix it agrees with, adds one token of its own, and rolls
its KV cache back past the rejected tokens.

- Greedy (temperature 0): a draft token is kept when it equals the target's argmax, so the output
  is token-identical to the target's own greedy decoding.
- Sampling: exact speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023): keep
  draft token x with probability min(1, p(x)/q(x)); on rejection draw from normalize(max(p - q, 0)).
  The output then follows the target's (temperature, top-p) distribution exactly, whatever the
  drafter proposes. Deterministic drafters (n-gram, greedy draft heads) have a one-hot q.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..engine.engine import Engine, Generation, probabilities, sample


@dataclass
class SpecGeneration(Generation):
    """A `Generation` plus what the drafter achieved."""

    cycles: int = 0  # target verification steps after the prefill
    proposed: list[int] = field(default_factory=list)  # per draft position: cycles that drafted it
    accepted: list[int] = field(default_factory=list)  # per draft position: cycles that accepted it
    draft_s: float = 0.0  # time spent in the drafter

    @property
    def acceptance_length(self) -> float:
        """Mean tokens produced per target step (accepted drafts + the target's own token)."""
        return (sum(self.accepted) + self.cycles) / self.cycles if self.cycles else float("nan")

    @property
    def acceptance_rates(self) -> list[float]:
        """Per draft position i: P(draft i accepted | drafts before it accepted)."""
        rates, prev = [], None
        for i, (p, a) in enumerate(zip(self.proposed, self.accepted)):
            base = p if i == 0 else min(p, prev)
            rates.append(a / base if base else float("nan"))
            prev = a
        return rates


def verify(logits: torch.Tensor, draft: list[int], draft_probs: torch.Tensor | None, temperature: float,
           top_p: float, generator: torch.Generator | None) -> tuple[int, int]:
    """Accept a prefix of `draft` given the target's `logits` ([len(draft) + 1, vocab]).

    Returns (number accepted, the target's next token after them).
    `draft_probs` ([len(draft), vocab]) is the drafter's distribution; None means one-hot (the draft
    tokens were chosen deterministically).
    """
    if temperature <= 0:
        target = logits.argmax(-1).tolist()
        n = 0
        while n < len(draft) and draft[n] == target[n]:
            n += 1
        return n, target[n]
    p = probabilities(logits, temperature, top_p)
    for i, x in enumerate(draft):
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        p_x = float(p[i, x])
        if q_x > 0 and torch.rand((), generator=generator).item() * q_x < p_x:
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - draft_probs[i]).clamp_min(0.0)
        total = residual.sum()
        # p == q exactly (possible in theory only): any draw from p is correct.
        row = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(row, 1, generator=generator))
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))


def tree_walk(logits: torch.Tensor, tokens: list[int], parents: list[int]) -> tuple[list[int], int]:
    """Greedy verification of a draft tree: follow the target's argmax from the root (row 0) while a
    child holds it. Node i (row i + 1) has parent row ``parents[i] + 1``. Returns the accepted nodes'
    rows and the target's token after the last of them."""
    target = logits.argmax(-1).tolist()
    children: dict[int, dict[int, int]] = {}
    for i, (tok, par) in enumerate(zip(tokens, parents)):
        children.setdefault(par + 1, {}).setdefault(tok, i + 1)
    row, path = 0, []
    while target[row] in children.get(row, {}):
        row = children[row][target[row]]
        path.append(row)
    return path, target[row]


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of each row (root first, depth 0) of a draft tree given as parent indices."""
    depth = [0] * (len(parents) + 1)
    for i, par in enumerate(parents):
        depth[i + 1] = depth[par + 1] + 1
    return depth


def tree_mask(parents: list[int]) -> torch.Tensor:
    """Ancestor mask ``[n + 1, n + 1]`` (root first): each row sees itself and its ancestors."""
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    for i, par in enumerate(parents):
        mask[i + 1] = mask[par + 1]
        mask[i + 1, i + 1] = True
    return mask


def speculative_generate(engine: Engine, drafter, prompt: torch.Tensor, max_new_tokens: int, k: int = 4,
                         temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                         stream=None, seed: int | None = None, tree: bool = False) -> SpecGeneration:
    """Generate like `engine.generate`, with `drafter` proposing up to `k` tokens per target step.

    `tree=True` (greedy only; the drafter needs ``propose_tree``) verifies a tree of up to `k` draft
    tokens in one step (attention restricted to each token's ancestors) and keeps its longest
    accepted branch.
    """
    if k < 1:
        raise ValueError(f"draft length k={k} must be at least 1")
    if tree and temperature > 0:
        raise ValueError("tree drafts are verified greedily: use temperature 0, or chain drafts to sample")
    if tree and not hasattr(drafter, "propose_tree"):
        raise ValueError(f"{type(drafter).__name__} drafts chains only: use tree=False")
    prompt, eos, gen = engine.prepare(prompt, max_new_tokens + k + 1, eos_token_id, seed)  # + room for a draft
    compile_before = engine.compile_s
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)
    first = sample(logits, temperature, top_p, gen)
    seq = prompt.tolist() + [first]
    drafter.start(engine, seq)
    out = SpecGeneration([first], prompt.numel(), ttft_s=0.0, decode_s=0.0, proposed=[0] * k, accepted=[0] * k)
    if stream is not None:
        stream(first)
    t1 = time.perf_counter()
    out.ttft_s = t1 - t0
    stopped = "eos" if first in eos else "length"
    while stopped == "length" and len(out.tokens) < max_new_tokens:
        # A compiled step keeps one graph per step length: always draft k (tokens past the end are
        # cut), and pad short drafts (any token is a valid proposal); k+1 rows cost about what 1 does.
        fixed = engine.fixed_sizes(tree)
        budget = k if fixed else min(k, max_new_tokens - len(out.tokens) - 1)
        td = time.perf_counter()
        draft_probs = None
        if budget == 0:
            draft, parents = [], []
        elif tree:
            draft, parents = drafter.propose_tree(seq, budget)
        else:
            draft, draft_probs = drafter.propose(seq, budget, temperature, top_p, gen)
            parents = list(range(-1, len(draft) - 1))
        if fixed and draft_probs is None and len(draft) < budget:
            pad = budget - len(draft)
            if tree:  # extra children of the root
                draft, parents = draft + [seq[-1]] * pad, parents + [-1] * pad
            else:  # a longer chain
                draft = draft + [draft[-1] if draft else seq[-1]] * pad
                parents = list(range(-1, len(draft) - 1))
        out.draft_s += time.perf_counter() - td
        base = len(seq) - 1  # the cache holds seq[:-1]
        chain = parents == list(range(-1, len(draft) - 1))
        depths = tree_depths(parents)
        if chain:
            logits = engine.forward(torch.tensor([seq[-1]] + draft))
        else:
            logits = engine.forward(torch.tensor([seq[-1]] + draft), positions=base + torch.tensor(depths),
                                    tree=tree_mask(parents))
        if chain and temperature > 0:
            n, nxt = verify(logits, draft, draft_probs, temperature, top_p, gen)
            path = list(range(1, n + 1))
        else:
            path, nxt = tree_walk(logits, draft, parents)
        if path == list(range(1, len(path) + 1)):
            engine.rollback(base + 1 + len(path))
        else:  # the accepted branch sits at scattered slots: move it after the root
            engine.cache.keep([base + r for r in path], base + 1)
        out.cycles += 1
        for d in set(depths[1:]):
            out.proposed[d - 1] += 1
        for d in range(1, len(path) + 1):
            out.accepted[d - 1] += 1
        new = [draft[r - 1] for r in path] + [nxt]
        td = time.perf_counter()
        hidden = engine.hidden[[0] + path] if engine.hidden is not None else None
        drafter.commit(seq, new, hidden)
        out.draft_s += time.perf_counter() - td
        seq.extend(new)
        for tok in new:
            out.tokens.append(tok)
            if stream is not None:
                stream(tok)
            if tok in eos:
                stopped = "eos"
                break
            if len(out.tokens) >= max_new_tokens:
                break
    t2 = time.perf_counter()
    out.decode_s = t2 - t1
    out.stopped_by = stopped
    out.compile_s = engine.compile_s - compile_before
    return out
