"""Prompts to token ids, off the engine's thread and after cheap size checks.

Every per-request check that needs a tokenizer runs here, in the HTTP process: size limits first
(characters and token ids, O(1)), then Unicode validity, then the tokenizer itself on a worker
thread of its own, so a huge or malformed prompt can neither stall the engine's steps nor reach it.
A prompt is refused without tokenising it when it cannot fit the context window: no token of the
vocabulary covers more than `max_token_bytes` bytes of text, so a text of more than
max_model_len x max_token_bytes bytes has more tokens than the window holds (x4 when the tokenizer
normalises text first, which can shrink it). Every failure is an InvalidRequestError naming the
field (a 400).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from oneiros.core import InvalidRequestError
from oneiros.server.engine_client import EngineClient

T = TypeVar("T")


class ModelText:
    """One model's tokenizer as the server uses it (one thread at a time)."""

    def __init__(self, name: str, hf: Any | None, max_model_len: int, vocab_size: int) -> None:
        self.name = name
        self.hf = hf
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_token_bytes = _max_token_bytes(hf) if hf is not None else 0
        normalizes = getattr(getattr(hf, "backend_tokenizer", None), "normalizer", None)
        self.max_chars = max_model_len * self.max_token_bytes * (4 if normalizes else 1)
        self._strs: dict[int, str] = {}

    # ---- checks (cheap: run on the event loop) --------------------------------------------------
    def check_text(self, text: str, field: str) -> None:
        if self.hf is None:
            raise InvalidRequestError(
                f"model {self.name!r} has no tokenizer: send token ids instead of text", field
            )
        if len(text) > self.max_chars:
            raise InvalidRequestError(
                f"{field} is too long: {len(text)} characters cannot fit the {self.max_model_len}"
                f"-token context window of model {self.name!r} (at most {self.max_chars} "
                "characters)",
                field,
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(
                f"{field} is not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) at "
                f"character {e.start}",
                field,
            ) from None

    def check_ids(self, ids: Sequence[Any], field: str) -> None:
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"{field} has {len(ids)} tokens but model {self.name!r} has a context window of "
                f"{self.max_model_len} tokens (at most {self.max_model_len - 1} prompt tokens)",
                field,
            )
        self.check_range(ids, field)

    def check_range(self, ids: Sequence[Any], field: str) -> None:
        vocab = self.vocab_size
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in ids):
            raise InvalidRequestError(f"{field}: token ids must be integers in [0, {vocab})", field)

    # ---- tokenizer work (a worker thread) -------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool, field: str) -> list[int]:
        try:
            return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])
        except Exception as e:
            raise InvalidRequestError(
                f"the tokenizer of model {self.name!r} cannot encode {field}: "
                f"{type(e).__name__}", field
            ) from None

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        continue_final_message: bool,
        add_special_tokens: bool,
    ) -> list[int]:
        if not getattr(self.hf, "chat_template", None):
            raise InvalidRequestError(
                f"model {self.name!r} has no chat template; use /v1/completions", "messages"
            )
        try:
            text = self.hf.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
        except Exception as e:
            raise InvalidRequestError(
                f"the chat template of model {self.name!r} rejected the messages: {e}", "messages"
            ) from None
        return self.encode(text, add_special_tokens, "messages")

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids) if self.hf is not None else ""

    def token_strs(self, ids: list[int]) -> list[str]:
        return [str(t) for t in self.hf.convert_ids_to_tokens(ids)] if self.hf is not None else []

    def token_str(self, token: int) -> str:
        """The text of one token (for logprobs); `<id>` without a tokenizer."""
        s = self._strs.get(token)
        if s is None:
            s = self.hf.decode([token]) if self.hf is not None else f"<{token}>"
            if len(self._strs) < 1 << 18:
                self._strs[token] = s
        return s


def _max_token_bytes(hf: Any) -> int:
    """Most UTF-8 bytes any vocabulary entry spells (an upper bound on the text one token covers:
    byte-level and SentencePiece pieces spell each byte with at least one byte)."""
    try:
        vocab = hf.get_vocab()
    except Exception:  # no vocabulary to read: assume long tokens
        return 64
    return max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1) or 1


class Preprocessor:
    """Tokenises requests for an EngineClient's models: checks on the event loop, tokenizer work
    on one worker thread (tokenizers are not shared between threads: the worker and the event
    loop each have a private copy)."""

    def __init__(self, client: EngineClient) -> None:
        self.worker: dict[str, ModelText] = {}
        self.loop: dict[str, ModelText] = {}
        for name in client.model_names:
            args = (client.max_model_len(name), client.vocab_size(name))
            self.worker[name] = ModelText(name, client.tokenizer(name), *args)
            self.loop[name] = ModelText(name, client.tokenizer(name), *args)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="oneiros-tokenize")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def prompt_ids(
        self,
        model: str,
        prompt: str | list[int],
        field: str = "prompt",
        add_special_tokens: bool = True,
    ) -> list[int]:
        """Token ids of a text or token-id prompt, checked against the model's window."""
        m = self.loop[model]
        if not prompt:
            raise InvalidRequestError(f"{field} is empty", field)
        if isinstance(prompt, str):
            m.check_text(prompt, field)
            ids = await self._run(self.worker[model].encode, prompt, add_special_tokens, field)
            if not ids:
                raise InvalidRequestError(f"{field} encodes to no tokens", field)
        else:
            ids = list(prompt)
        m.check_ids(ids, field)
        return ids

    async def chat_ids(
        self,
        model: str,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
    ) -> list[int]:
        m = self.loop[model]
        for msg in messages:
            m.check_text(msg.get("content") or "", "messages")
        total = sum(len(msg.get("content") or "") for msg in messages)
        if total > m.max_chars:
            raise InvalidRequestError(
                f"messages are too long: {total} characters cannot fit the {m.max_model_len}-token "
                f"context window of model {model!r} (at most {m.max_chars} characters)",
                "messages",
            )
        ids = await self._run(
            self.worker[model].encode_chat,
            messages,
            add_generation_prompt,
            continue_final_message,
            add_special_tokens,
        )
        m.check_ids(ids, "messages")
        return ids

    async def decode(self, model: str, ids: list[int]) -> str:
        self.loop[model].check_range(ids, "tokens")
        return await self._run(self.worker[model].decode, ids)

    async def token_strs(self, model: str, ids: list[int]) -> list[str]:
        return await self._run(self.worker[model].token_strs, ids)

    def token_str(self, model: str, token: int) -> str:
        return self.loop[model].token_str(token)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
