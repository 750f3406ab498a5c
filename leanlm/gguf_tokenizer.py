"""A faithful tokenizer for GGUF files that carry a SentencePiece-BPE vocabulary (Gemma).

transformers' GGUF converter turns Gemma's vocabulary into a Unigram model scored by the GGUF
"scores". Those scores are BPE merge ranks, not log-probabilities, so Unigram splits common words
into fragments ("capital" -> "c", "ap", "it", "al") and the converted model's perplexity explodes.
Here the BPE merges are rebuilt from the ranks instead, as SentencePiece applies them.
"""

from __future__ import annotations

from pathlib import Path

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6


def needs_own_tokenizer(gguf_path: Path) -> bool:
    """True for GGUF files whose SentencePiece-BPE vocabulary transformers converts wrongly."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()
    model = reader.fields.get("tokenizer.ggml.model")
    return arch.startswith("gemma") and model is not None and model.contents() == "llama"


def _merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges from SentencePiece ranks: a token made of two vocabulary pieces is one merge,
    ordered by the merged token's score (higher merges first), then by the pieces' ids."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    merges = []
    for tok, i in vocab.items():
        if types[i] != NORMAL or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], i, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def build_tokenizer(gguf_path: Path):
    """A `PreTrainedTokenizerFast` equivalent to the GGUF's SentencePiece-BPE tokenizer."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(gguf_path))

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    tokens = [t.replace(" ", "\u2581") for t in field("tokenizer.ggml.tokens")]
    types = field("tokenizer.ggml.token_type")
    scores = field("tokenizer.ggml.scores")
    unk = tokens[field("tokenizer.ggml.unknown_token_id", 3)]
    bos = tokens[field("tokenizer.ggml.bos_token_id")]
    eos = tokens[field("tokenizer.ggml.eos_token_id")]
    pad_id = field("tokenizer.ggml.padding_token_id")

    model = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=_merges(tokens, types, scores),
                unk_token=unk, byte_fallback=True, fuse_unk=True)
    tk = Tokenizer(model)
    normal = [normalizers.Replace(" ", "\u2581")]
    if field("tokenizer.ggml.add_space_prefix", False):
        normal.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(normal)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # SentencePiece matches control and user-defined symbols whole, before BPE.
    tk.add_tokens([AddedToken(tokens[i], normalized=False, special=False)
                   for i, t in enumerate(types) if t == USER_DEFINED and "\u2581" not in tokens[i]])
    tk.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                           for i, t in enumerate(types) if t == CONTROL])
    if field("tokenizer.ggml.add_bos_token", True):
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=unk,
        pad_token=None if pad_id is None else tokens[pad_id], clean_up_tokenization_spaces=False)
