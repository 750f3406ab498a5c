"""Perplexity over fixed windows, reported per token and as bits per byte."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LeanLMError

DEFAULT_WINDOW = 512


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) for each window over a stream of `n_tokens` tokens.

    A window feeds tokens ``[begin, end)`` (at most `window`) and predicts ``[begin + 1, end]``; it
    scores only the targets from ``first`` on, which no earlier window scored. Every token but the
    stream's first (which has no context) is scored exactly once.
    """
    if window < 1 or stride < 1 or stride > window:
        raise LeanLMError(f"window {window} / stride {stride} are invalid: need 1 <= stride <= window")
    out, first, begin = [], 1, 0
    while first < n_tokens:
        end = min(begin + window, n_tokens - 1)
        out.append((begin, end, first))
        first, begin = end + 1, begin + stride
    return out


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, byte_lengths: torch.Tensor | None = None, window: int | None = None,
               stride: int | None = None, progress: bool = True) -> dict:
    """Token perplexity (and bits per byte when byte lengths are given) of `model` on the token stream `ids`.

    `window` defaults to 512 tokens, or the model's context if that is shorter; `stride` to the window.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    if window is None:
        window = min(DEFAULT_WINDOW, limit or DEFAULT_WINDOW)
    stride = stride or window
    if limit is not None and window > limit:
        raise LeanLMError(f"window {window} exceeds the model's context of {limit} tokens: pass --window {limit} or less")
    nll, count = 0.0, 0
    spans = windows(len(ids), window, stride)
    for begin, end, first in tqdm(spans, desc="perplexity", disable=not progress, unit="window"):
        logits = model(ids[begin:end].unsqueeze(0), use_cache=False).logits[0]
        # the logits at input position p predict token p + 1
        pred = logits[first - 1 - begin:end - begin].float()
        nll += F.cross_entropy(pred, ids[first:end + 1], reduction="sum").item()
        count += end + 1 - first
    out = {"perplexity": math.exp(nll / count), "nll_nats": nll, "scored_tokens": count,
           "window": window, "stride": stride}
    if byte_lengths is not None:
        n_bytes = int(byte_lengths[1:].sum())  # the bytes of the scored tokens
        out["bits_per_byte"] = nll / math.log(2) / n_bytes
        out["scored_bytes"] = n_bytes
    return out
