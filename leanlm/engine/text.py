"""Text in, text out: `leanlm.generate` and the streaming detokenizer behind `leanlm generate`."""

from __future__ import annotations

import torch

from ..errors import LeanLMError
from .engine import Engine, Generation


class StreamingText:
    """Turns tokens into text as they arrive, emitting only complete characters (a multi-byte
    character split across tokens appears once all its tokens are in)."""

    def __init__(self, tokenizer, emit):
        self.tokenizer, self.emit = tokenizer, emit
        self.tokens: list[int] = []
        self.sent = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # incomplete UTF-8 sequence: wait for the next token
            return
        self.emit(text[self.sent:])
        self.sent = len(text)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LeanLMError("this model's tokenizer has no chat template: drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=False)
        return torch.tensor(ids if isinstance(ids, list) else ids["input_ids"])
    ids = tokenizer(prompt).input_ids
    if not ids:
        raise LeanLMError("the prompt is empty: pass some text")
    return torch.tensor(ids)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, chat: bool = False, compile: bool = True, stream=None, draft: str | None = None,
             draft_tokens: int = 4, tree: bool = False) -> tuple[str, Generation]:
    """Continue `prompt` (greedy at temperature 0); returns the new text and the `Generation`
    (tokens, time to first token, decode tokens/s). `stream(text)` receives text as it is produced.

    `draft` turns on speculative decoding (same output): ``"ngram"``, an EAGLE-3 head folder, or a
    draft model sharing the tokenizer; `draft_tokens` are proposed per target step (as a tree of
    that many tokens with `tree`, greedy only)."""
    ids = encode_prompt(tokenizer, prompt, chat)
    pieces: list[str] = []

    def emit(s: str) -> None:
        pieces.append(s)
        if stream is not None:
            stream(s)

    detok = StreamingText(tokenizer, emit)
    max_len = ids.numel() + max_new_tokens + draft_tokens + 8
    kw = dict(temperature=temperature, top_p=top_p, eos_token_id=tokenizer.eos_token_id, stream=detok, seed=seed)
    if draft:
        from ..speculative.api import Drafting

        with Drafting(model, tokenizer, draft, max_len=max_len, compile=compile) as d:
            gen = d.generate(ids, max_new_tokens, k=draft_tokens, tree=tree, **kw)
    else:
        with Engine(model, max_len=max_len, compile=compile) as eng:
            gen = eng.generate(ids, max_new_tokens, **kw)
    return "".join(pieces), gen
