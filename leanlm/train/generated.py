"""Training text sampled from the float model itself (data-free QAT/QAD, as in LLM-QAT).

Fine-tuning a model on its own samples changes it by nothing in expectation (the expected gradient
of log p under samples of p is zero), so QAT and QAD on such text win back what quantization lost
without also adapting the model to the evaluation text's domain, and need no training corpus: a few
prompt tokens per sequence from a corpus (or a file) start it, the model writes the rest.

A source named `generated` (prompts from wiki) or `generated:SOURCE` selects it wherever training
text is named (`training_sequences`, `leanlm qat --data generated`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanLMError

log = logging.getLogger(__name__)

PREFIX = "generated"
PROMPT_TOKENS = 8  # real tokens that open each sequence: a topic, not a domain (8 of 256 tokens)


def prompt_source(source: str) -> str | None:
    """The corpus or file that prompts a `generated[:SOURCE]` training source; None for plain text."""
    if source == PREFIX:
        return "wiki"
    if source.startswith(PREFIX + ":"):
        rest = source[len(PREFIX) + 1:]
        if not rest:
            raise LeanLMError(f"training data '{source}': name the prompt source after the colon, e.g. generated:wiki")
        return rest
    return None


def _sample(logits: torch.Tensor, temperature: float, gens: list[torch.Generator]) -> torch.Tensor:
    from ..engine.engine import probabilities

    if temperature == 0:
        return logits.argmax(-1, keepdim=True).cpu()
    probs = probabilities(logits.cpu(), temperature)
    # One generator per sequence, so what a row samples does not depend on the batch it ran in; each
    # gives one uniform draw and the inverse CDF runs batched (a multinomial per row took a third of the time).
    u = torch.cat([torch.rand(1, generator=g) for g in gens]).unsqueeze(1)
    cdf = probs.double().cumsum(-1)
    picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return picks.clamp_(max=probs.shape[-1] - 1)


@torch.inference_mode()
def generated_sequences(model: nn.Module, tokenizer, n: int, seq_len: int, prompts: str = "wiki",
                        prompt_tokens: int = PROMPT_TOKENS, temperature: float = 1.0, batch_size: int = 128,
                        seed: int = 0, cache: str | Path | None = None, progress: bool = True) -> torch.Tensor:
    """`n` sequences of `seq_len` tokens [N, L]: `prompt_tokens` from the calibration split of `prompts`,
    then tokens sampled from `model` at `temperature` (1: its own distribution; 0: greedy).

    Seeded and batched with a KV cache; with `cache` (a .safetensors path) the sequences are saved and
    reused while the model's weights and these settings stay the same.
    """
    from tqdm.auto import tqdm

    from ..data import calibration_batches
    from .distill import fingerprint

    if not 1 <= prompt_tokens < seq_len:
        raise LeanLMError(f"prompt tokens ({prompt_tokens}) must be at least 1 and below the sequence length ({seq_len})")
    if temperature < 0:
        raise LeanLMError(f"sampling temperature {temperature} must be >= 0")
    starts = calibration_batches(tokenizer, prompts, n, max(2, prompt_tokens), seed=seed, model=model)[:, :prompt_tokens]
    key = fingerprint(model, starts, f"L={seq_len},T={temperature},seed={seed},sampler=icdf")
    path = Path(cache) if cache else None
    if path is not None and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                log.info(f"reusing generated training text {path}")
                return f.get_tensor("ids")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    bar = tqdm(total=n * (seq_len - prompt_tokens), desc="generating training text", unit="tok", disable=not progress)
    for b in range(0, n, batch_size):
        ids = starts[b:b + batch_size]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + b + r) for r in range(len(ids))]
        out = model(ids.to(device), use_cache=True)
        seq = [ids]
        for i in range(seq_len - prompt_tokens):
            nxt = _sample(out.logits[:, -1], temperature, gens)
            seq.append(nxt)
            bar.update(len(ids))
            if i + 1 < seq_len - prompt_tokens:
                out = model(nxt.to(device), past_key_values=out.past_key_values, use_cache=True)
        rows.append(torch.cat(seq, 1))
    bar.close()
    model.train(was_training)
    data = torch.cat(rows)
    if path is not None:
        from ..atomic import save_tensors

        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"ids": data}, metadata={"key": key})
    return data
