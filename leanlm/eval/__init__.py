"""Evaluation: perplexity, size, speed, and reports."""

from __future__ import annotations

import time

from ..data import eval_tokens
from .perplexity import perplexity
from .size import model_size
from .speed import measure_speed

__all__ = ["evaluate", "perplexity", "model_size", "measure_speed"]


def evaluate(model, tokenizer, data: str = "wiki", max_tokens: int = 8192, window: int | None = None,
             stride: int | None = None, speed: bool = False, name: str | None = None,
             progress: bool = True) -> dict:
    """Quality (perplexity, bits per byte), size, and optionally speed of a model, as one result dict."""
    t0 = time.perf_counter()
    ids, nbytes = eval_tokens(tokenizer, data, max_tokens)
    result = {"name": name or getattr(model, "leanlm_source", "model"),
              "model": getattr(model, "leanlm_source", None),
              "recipe": getattr(getattr(model, "leanlm_recipe", None), "name", None),
              "data": data, "eval_tokens": max_tokens}
    result.update(perplexity(model, ids, nbytes, window=window, stride=stride, progress=progress))
    result.update(model_size(model))
    if speed:
        result.update(measure_speed(model))
    result["seconds"] = time.perf_counter() - t0
    return result
