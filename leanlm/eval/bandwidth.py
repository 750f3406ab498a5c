"""The memory-bandwidth bound on batch-1 decoding: bytes of weights read per token / read bandwidth."""

from __future__ import annotations

import time

import torch
from torch import nn


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a large-array read (a sum over a float32 array far larger than the caches).

    Best of `repeats` with all of torch's threads, as a decode step uses them.
    """
    a = torch.empty(nbytes // 4).uniform_()  # distinct values, like weights (no page the host could share)
    a.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of stored weights one decoded token reads: every parameter and buffer once, except an
    input embedding table that no output layer shares (a lookup reads one row of it)."""
    seen: set[int] = set()
    total = 0
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    from ..quant.embedding import TiedEmbedding

    # An embedding tied to a quantized output layer holds no tensor: its lookups read that layer's codes.
    tied = isinstance(emb, TiedEmbedding) or (emb is not None and out is not None
                                             and getattr(out, "weight", None) is emb.weight)
    skip = set() if emb is None or tied else {id(emb.weight)}
    from .size import held_tensors

    for t in held_tensors(model):
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        if id(t) in skip:
            total += t.shape[-1] * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total
