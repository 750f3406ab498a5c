"""Windowed perplexity: coverage of the token stream and agreement with a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from leanlm.errors import LeanLMError
from leanlm.eval.perplexity import perplexity, windows


@pytest.mark.parametrize("n,window,stride", [(1025, 512, 512), (1000, 512, 256), (10, 4, 1), (7, 16, 16), (2, 1, 1)])
def test_windows_score_every_token_once(n, window, stride):
    scored = []
    for begin, end, first in windows(n, window, stride):
        assert end - begin <= window and begin < first <= end + 1
        scored.extend(range(first, end + 1))
    assert scored == list(range(1, n))


def test_windows_reject_bad_stride():
    with pytest.raises(LeanLMError, match="stride"):
        windows(100, 8, 9)


def _reference_nll(model, ids, window):
    """Non-overlapping windows, each predicting its next `window` tokens, summed directly."""
    total = 0.0
    for b in range(0, len(ids) - 1, window):
        x = ids[b:min(b + window, len(ids) - 1)]
        y = ids[b + 1:b + 1 + len(x)]
        with torch.no_grad():
            logp = F.log_softmax(model(x[None]).logits[0].double(), -1)
        total -= logp.gather(1, y[:, None]).sum().item()
    return total


def test_perplexity_matches_direct_computation(tiny_model):
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1))
    nbytes = torch.full((300,), 2)
    r = perplexity(tiny_model, ids, nbytes, window=64, progress=False)
    ref = _reference_nll(tiny_model, ids, 64)
    assert r["scored_tokens"] == 299
    assert r["nll_nats"] == pytest.approx(ref, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(ref / 299), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(ref / math.log(2) / (299 * 2), rel=1e-5)


def test_overlapping_stride_uses_more_context_and_same_token_count(tiny_model):
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(2))
    a = perplexity(tiny_model, ids, window=64, stride=64, progress=False)
    b = perplexity(tiny_model, ids, window=64, stride=16, progress=False)
    assert a["scored_tokens"] == b["scored_tokens"] == 299
    assert a["perplexity"] != b["perplexity"]


def test_window_larger_than_context(tiny_model):
    with pytest.raises(LeanLMError, match="exceeds the model's context of 256"):
        perplexity(tiny_model, torch.zeros(600, dtype=torch.long), window=512, progress=False)
