"""Text corpora, deterministic calibration/evaluation splits, and calibration batches.

Named corpora (all offline):
- ``wiki``: the Wikipedia excerpt in gensim's test data (206 pages; redirects dropped, markup
  stripped with gensim's ``filter_wiki``, captions and list fragments under 8 words dropped);
- ``news``: gensim's Lee background corpus (300 news stories, one per line);
- ``pydoc``: the standard library's ``pydoc_data.topics`` (Python reference topics, sorted by key).

User files: plain text (documents separated by blank lines) or JSONL with a ``text`` field.

Split rule (documented, deterministic, disjoint): documents keep their source order; document
``i`` belongs to the evaluation split when ``i % 5 == 4`` and to the calibration split otherwise.
A source of fewer than 5 documents is split by characters instead: the first 80% calibrates,
the rest evaluates (cut at a paragraph or line break).
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import json
import re
from pathlib import Path

import torch

from .errors import LeanLMError

CORPORA = {
    "wiki": "Wikipedia excerpt from gensim's test data (markup stripped)",
    "news": "Lee background news corpus from gensim's test data",
    "pydoc": "Python reference topics from the standard library (pydoc_data.topics)",
}
EVAL_EVERY = 5
SPLITS = ("calib", "eval")


def _gensim_test_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LeanLMError("the named corpora need the 'gensim' package: run `make setup`")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise LeanLMError(f"gensim's test data lacks '{name}': reinstall gensim with `make setup`")
    return path


_MARKUP = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+$")


def _clean_wiki(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    paragraphs = []
    for line in filter_wiki(text).splitlines():
        line = _MARKUP.sub("", line).strip()
        heading = _HEADING.match(line)
        if heading:
            paragraphs.append(heading.group(1))
        elif len(line.split()) >= 8:
            paragraphs.append(line)
    # A heading with no body after it is noise; drop trailing/consecutive headings.
    kept = [p for i, p in enumerate(paragraphs)
            if len(p.split()) >= 8 or (i + 1 < len(paragraphs) and len(paragraphs[i + 1].split()) >= 8)]
    return "\n\n".join(kept)


def _wiki_documents() -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages

    path = _gensim_test_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    docs = []
    with bz2.open(path) as f:
        for title, text, _ in extract_pages(f):
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            body = _clean_wiki(text)
            if len(body) >= 500:
                docs.append(f"{title}\n\n{body}")
    return docs


def _news_documents() -> list[str]:
    path = _gensim_test_file("lee_background.cor")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def _file_documents(path: Path) -> list[str]:
    if path.stat().st_size == 0:
        raise LeanLMError(f"text file '{path}' is empty: pass a file with text in it")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LeanLMError(f"text file '{path}' is not UTF-8 (bad byte at offset {e.start}): "
                          "convert it with `iconv -t UTF-8`") from None
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LeanLMError(f"'{path}' line {n} is not valid JSON ({e.msg}): write one JSON object per line") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise LeanLMError(f"'{path}' line {n} has no string 'text' field: write {{\"text\": \"...\"}} per line")
            if rec["text"].strip():
                docs.append(rec["text"].strip())
    else:
        docs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not docs:
        raise LeanLMError(f"text file '{path}' holds no text (only whitespace): pass a file with text in it")
    return docs


@functools.lru_cache(maxsize=8)
def documents(source: str) -> tuple[str, ...]:
    """All distinct documents of a named corpus or a user text/JSONL file, in source order.

    Repeated documents are kept once (the Lee corpus repeats some stories), so no text can land in
    both the calibration and the evaluation split.
    """
    loaders = {"wiki": _wiki_documents, "news": _news_documents, "pydoc": _pydoc_documents}
    if source in loaders:
        docs = loaders[source]()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise LeanLMError(f"data '{source}' is neither a named corpus ({', '.join(CORPORA)}) nor an existing "
                              "file: pass one of those or a .txt/.jsonl file")
        docs = _file_documents(path)
    return tuple(dict.fromkeys(docs))


def split_text(source: str, split: str) -> str:
    """The calibration or evaluation text of a source (disjoint; see the module docstring)."""
    if split not in SPLITS:
        raise LeanLMError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    docs = documents(source)
    if len(docs) >= EVAL_EVERY:
        picked = [d for i, d in enumerate(docs) if (i % EVAL_EVERY == EVAL_EVERY - 1) == (split == "eval")]
        return "\n\n".join(picked)
    text = "\n\n".join(docs)
    cut = int(len(text) * 0.8)
    brk = text.rfind("\n", 0, cut)
    cut = brk if brk > len(text) * 0.5 else cut
    part = text[:cut] if split == "calib" else text[cut:]
    if not part.strip():
        raise LeanLMError(f"data '{source}' is too short to split into calibration and evaluation text: add more text")
    return part.strip()


def _check_context(model_or_config, seq_len: int) -> None:
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise LeanLMError(f"sequence length {seq_len} exceeds the model's context of {limit} tokens: "
                          f"pass --seq-len {limit} or less")


def eval_tokens(tokenizer, source: str = "wiki", max_tokens: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `max_tokens` tokens of the evaluation split, and each token's length in UTF-8 bytes.

    A token's byte length counts the text from the end of the previous token to its own end, so the
    lengths add up to the bytes of text covered (bits per byte compares across tokenizers).
    """
    text = split_text(source, "eval")
    # Tokenize a generous prefix only: the whole split can be far longer than the budget.
    prefix_chars = max_tokens * 12 + 1000
    for chunk in ((text[:prefix_chars], text) if len(text) > prefix_chars else (text,)):
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        # Skip the possibly shortened last tokens of a prefix: they may tokenize differently in full text.
        if len(enc["input_ids"]) >= max_tokens + 16 or chunk is text:
            break
    ids, offsets = enc["input_ids"][:max_tokens], enc["offset_mapping"][:max_tokens]
    if len(ids) < max_tokens:
        raise LeanLMError(f"data '{source}' has only {len(ids)} evaluation tokens, fewer than --max-tokens "
                          f"{max_tokens}: lower --max-tokens or add text")
    nbytes, prev_end = [], 0
    for start, end in offsets:
        end = max(end, prev_end)
        nbytes.append(len(chunk[prev_end:end].encode("utf-8")))
        prev_end = end
    return torch.tensor(ids, dtype=torch.long), torch.tensor(nbytes, dtype=torch.long)


def calibration_batches(tokenizer, source: str = "wiki", n_samples: int = 128, seq_len: int = 512,
                        seed: int = 0, model=None) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens from the calibration split, as a LongTensor [N, L].

    Windows start at offsets drawn without replacement (seeded) from non-overlapping positions of the
    tokenized calibration text, so samples spread over the whole corpus and never overlap.
    """
    if n_samples < 1 or seq_len < 2:
        raise LeanLMError(f"calibration needs at least 1 sample of 2 tokens (got {n_samples} x {seq_len})")
    if model is not None:
        _check_context(model, seq_len)
    ids = torch.tensor(tokenizer(split_text(source, "calib"), add_special_tokens=False)["input_ids"],
                       dtype=torch.long)
    slots = len(ids) // seq_len
    if slots < n_samples:
        raise LeanLMError(f"data '{source}' has {len(ids)} calibration tokens, enough for {slots} samples of "
                          f"{seq_len}: lower --calib-samples or --seq-len, or add text")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(slots, generator=g)[:n_samples].sort().values
    return torch.stack([ids[p * seq_len:(p + 1) * seq_len] for p in picks.tolist()])
