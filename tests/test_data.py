"""Corpora, disjoint deterministic splits, evaluation tokens and calibration batches."""

from __future__ import annotations

import json

import pytest
import torch

from leanlm.data import EVAL_EVERY, calibration_batches, documents, eval_tokens, split_text
from leanlm.errors import LeanLMError


@pytest.mark.parametrize("name", ["wiki", "news", "pydoc"])
def test_named_corpora_split_disjoint(name):
    docs = documents(name)
    assert len(docs) >= 20
    calib, ev = split_text(name, "calib"), split_text(name, "eval")
    assert ev == "\n\n".join(docs[EVAL_EVERY - 1::EVAL_EVERY])
    calib_docs = [d for i, d in enumerate(docs) if i % EVAL_EVERY != EVAL_EVERY - 1]
    assert calib == "\n\n".join(calib_docs)
    assert set(docs[EVAL_EVERY - 1::EVAL_EVERY]).isdisjoint(calib_docs)
    assert len(ev) < len(calib)


def test_wiki_markup_is_stripped():
    text = split_text("wiki", "calib")
    assert "'''" not in text and "[[" not in text and "{{" not in text and "#REDIRECT" not in text


def test_user_text_file_split(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"paragraph number {i} with some words" for i in range(10)))
    assert split_text(str(f), "eval") == "paragraph number 4 with some words\n\nparagraph number 9 with some words"


def test_user_jsonl_and_short_text(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)))
    assert documents(str(f)) == ("doc 0", "doc 1", "doc 2")
    calib, ev = split_text(str(f), "calib"), split_text(str(f), "eval")
    assert calib.startswith("doc 0") and ev.endswith("doc 2") and ev not in calib


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"caf\xe9 au lait", "not UTF-8"),
    (b"   \n\n  ", "no text"),
])
def test_bad_text_files(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(LeanLMError, match=match):
        documents(str(f))


def test_bad_jsonl(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(LeanLMError, match="line 2 has no string 'text'"):
        documents(str(f))
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(LeanLMError, match="line 2 is not valid JSON"):
        documents(str(f))


def test_unknown_source():
    with pytest.raises(LeanLMError, match="neither a named corpus"):
        documents("no-such-corpus")


def test_eval_tokens_bytes_cover_text(tokenizer):
    ids, nbytes = eval_tokens(tokenizer, "news", 500)
    assert ids.shape == nbytes.shape == (500,)
    covered = tokenizer.decode(ids.tolist())
    assert int(nbytes.sum()) == len(covered.encode("utf-8"))
    again, _ = eval_tokens(tokenizer, "news", 500)
    assert torch.equal(ids, again)


def test_eval_tokens_budget_too_large(tokenizer, tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("\n\n".join(["a short paragraph"] * 10))
    with pytest.raises(LeanLMError, match="lower --max-tokens"):
        eval_tokens(tokenizer, str(f), 10_000)


def test_calibration_batches_deterministic_and_from_calib_split(tokenizer):
    a = calibration_batches(tokenizer, "news", n_samples=8, seq_len=64, seed=0)
    b = calibration_batches(tokenizer, "news", n_samples=8, seq_len=64, seed=0)
    c = calibration_batches(tokenizer, "news", n_samples=8, seq_len=64, seed=1)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    calib_ids = tokenizer(split_text("news", "calib"), add_special_tokens=False)["input_ids"]
    stream = ",".join(map(str, calib_ids))
    assert all(",".join(map(str, row.tolist())) in stream for row in a)


def test_calibration_too_many_samples_and_context(tokenizer, tiny_model):
    with pytest.raises(LeanLMError, match="lower --calib-samples"):
        calibration_batches(tokenizer, "news", n_samples=100_000, seq_len=512)
    with pytest.raises(LeanLMError, match="exceeds the model's context of 256"):
        calibration_batches(tokenizer, "news", n_samples=1, seq_len=1024, model=tiny_model)
