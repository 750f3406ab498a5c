"""Drafters: cheap proposers of the next few tokens, verified by `speculative_generate`.

Every drafter has three methods, called in this order:
- ``start(engine, seq)``: a new sequence; the target has prefilled ``seq[:-1]`` (its hidden states,
  if the engine keeps any, are in ``engine.hidden``) and ``seq[-1]`` is its first new token;
- ``propose(seq, k, temperature, top_p, generator) -> (tokens, probs)``: up to ``k`` tokens to follow
  ``seq``, and the distribution each was drawn from (``[len(tokens), vocab]``), or None when they
  were chosen deterministically;
- ``commit(seq, new, hidden)``: the target kept ``new`` after ``seq``; ``hidden`` holds its kept
  hidden states (one row per position from ``seq[-1]`` on), or None.
"""

from __future__ import annotations

import torch

from ..engine.engine import Engine, probabilities
from ..errors import LeanLMError


class NGramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    `max_n` down to `min_n`) and propose the tokens that followed it. No model, no training."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n (got {min_n}, {max_n})")
        self.max_n, self.min_n = max_n, min_n

    def start(self, engine, seq) -> None:
        pass

    def _continuations(self, seq: list[int], k: int):
        """What followed each earlier occurrence of the last n tokens: longest n first, latest first."""
        n_seq = len(seq)
        for n in range(min(self.max_n, n_seq - 1), self.min_n - 1, -1):
            suffix = seq[n_seq - n:]
            for start in range(n_seq - n - 1, -1, -1):  # not the suffix itself
                if seq[start:start + n] == suffix:
                    # A match close to the end runs into the draft itself, which continues a
                    # repeating pattern with its period.
                    draft: list[int] = []
                    for i in range(k):
                        j = start + n + i
                        draft.append(seq[j] if j < n_seq else draft[j - n_seq])
                    yield draft

    def propose(self, seq: list[int], k: int, temperature=0.0, top_p=1.0, generator=None):
        return next(self._continuations(seq, k), []), None

    def propose_tree(self, seq: list[int], k: int) -> tuple[list[int], list[int]]:
        """Up to `k` tokens: the continuations (at most k/2 deep) of several matches, merged into a trie."""
        tokens: list[int] = []
        parents: list[int] = []
        children: dict[int, dict[int, int]] = {}
        for cont in self._continuations(seq, max(1, (k + 1) // 2)):
            node = -1
            for tok in cont:
                nxt = children.setdefault(node, {}).get(tok)
                if nxt is None:
                    if len(tokens) == k:
                        return tokens, parents
                    nxt = len(tokens)
                    tokens.append(tok)
                    parents.append(node)
                    children[node][tok] = nxt
                node = nxt
        return tokens, parents

    def commit(self, seq, new, hidden) -> None:
        pass


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary and special tokens)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


class ModelDrafter:
    """A smaller causal LM with the target's tokenizer, run by its own engine (compiled, rollback)."""

    def __init__(self, model, max_len: int = 2048, compile: bool = True, target_vocab: int | None = None):
        vocab = model.get_output_embeddings().out_features
        if target_vocab is not None and vocab != target_vocab:
            raise LeanLMError(f"the draft model's vocabulary has {vocab} tokens, the target's {target_vocab}: "
                              "a draft model must share the target's tokenizer")
        self.engine = Engine(model, max_len=max_len, compile=compile)
        self.cached: list[int] = []  # tokens whose keys/values are in the draft engine's cache

    def start(self, engine, seq) -> None:
        self.cached = []
        self.engine.rollback(0)

    def propose(self, seq: list[int], k: int, temperature=0.0, top_p=1.0, generator=None):
        # Keep the longest cached prefix of `seq`, but always re-run at least its last token (its
        # logits propose the first draft).
        common = 0
        limit = min(len(self.cached), len(seq) - 1)
        while common < limit and self.cached[common] == seq[common]:
            common += 1
        pending = seq[common:]
        if common == 0:
            logits = self.engine.prefill(torch.tensor(pending))[None]
        else:
            self.engine.rollback(common)
            logits = self.engine.forward(torch.tensor(pending))
        self.cached = list(seq)
        tokens, rows = [], []
        for i in range(k):
            last = logits[-1]
            if temperature <= 0:
                tok = int(last.argmax())
            else:
                q = probabilities(last, temperature, top_p)
                tok = int(torch.multinomial(q, 1, generator=generator))
                rows.append(q)
            tokens.append(tok)
            if i + 1 < k:
                logits = self.engine.forward(torch.tensor([tok]))
                self.cached.append(tok)
        return tokens, (torch.stack(rows) if rows else None)

    def commit(self, seq, new, hidden) -> None:
        pass

    def close(self) -> None:
        self.engine.close()
