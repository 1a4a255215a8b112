"""Tokenizer wrapper: prompt and chat encoding, and incremental detokenisation for stop strings."""

from __future__ import annotations

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


def stable_text(tok: Tokenizer, ids: list[int]) -> str:
    """Decoded text, minus a trailing partial UTF-8 character that the next token may complete."""
    text = tok.decode(ids)
    return text.removesuffix("\ufffd")
