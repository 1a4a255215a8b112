"""Tokenizer wrapper: prompt and chat encoding, and incremental detokenisation (streamed text, stop
strings)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oneiros.core import InvalidRequestError


class Tokenizer:
    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self.hf.chat_template:
            raise InvalidRequestError("this model has no chat template; use a plain prompt", "messages")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def stable_text(tok: Tokenizer, ids: Sequence[int]) -> str:
    """Decoded text, minus a trailing partial UTF-8 character that the next token may complete."""
    text = tok.decode(list(ids))
    return text.removesuffix("\ufffd")


class IncrementalText:
    """`stable_text` of a growing token list, decoding only its end: a step costs a few tokens of
    decoding instead of all of them (which made a long generation quadratic).

    The window starts one stable point back: the tokens from `prefix` are decoded, and the text of
    the tokens from `prefix` to `read` (already part of `text`) is cut off its front, so a token's
    leading space or a character split across tokens comes out as in a full decode. Where a window's
    text does not start with that known text (tokenizers that rewrite spaces by context), the whole
    list is decoded instead."""

    __slots__ = ("tok", "text", "prefix", "read", "known", "full")

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.text = ""  # the stable text of ids[:read]
        self.prefix = 0
        self.read = 0
        self.known = ""  # the decoded text of ids[prefix:read]
        self.full = bool(getattr(tok.hf, "clean_up_tokenization_spaces", False))

    def update(self, ids: Sequence[int]) -> str:
        if self.full:
            return stable_text(self.tok, ids)
        if len(ids) == self.read:
            return self.text
        window = self.tok.decode(list(ids[self.prefix :]))
        if not window.startswith(self.known):
            self.full = True
            return stable_text(self.tok, ids)
        new = window[len(self.known) :]
        if new.endswith("\ufffd"):  # a partial character: not a stable point yet
            return self.text + new.removesuffix("\ufffd")
        self.text += new
        self.prefix, self.read = self.read, len(ids)
        self.known = self.tok.decode(list(ids[self.prefix : self.read]))
        return self.text
