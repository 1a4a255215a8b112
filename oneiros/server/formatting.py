"""OpenAI response bodies from RequestOutputs: completions and chat completions, whole or as stream
chunks, with usage and log-probabilities. Pure functions; the text of a token comes from a
`token_str(id) -> str` the caller passes (the server's tokenizer copy, or anything else)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from oneiros.core import RequestOutput

TokenStr = Callable[[int], str]


@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str  # the name the client asked for
    chat: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def response_id(request_id: str, chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + request_id.removeprefix("req-")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def total_usage(outputs: Sequence[RequestOutput], n: int = 1) -> dict[str, int]:
    """Usage of a request's choices, prompt-major (choice p * n + j is sibling j of prompt p):
    each prompt counted once (its n siblings share it), every choice's completion tokens."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs[:: max(1, n)])
    return usage(prompt, sum(len(o.token_ids) for o in outputs))


def completion_logprobs(
    token_str: TokenStr, out: RequestOutput, start: int, offset: int
) -> dict[str, Any]:
    """Completions-style logprobs of out's tokens from `start` on; `offset` is the text offset of
    the first. Each top_logprobs entry holds the requested alternatives and, as vLLM's do, the
    sampled token when it is not among them."""
    ids = out.token_ids
    toks = [token_str(t) for t in ids[start:]]
    tops = None
    if len(out.top_logprobs):
        tops = []
        for k in range(start, len(ids)):
            d = out.top_logprobs[k] if k < len(out.top_logprobs) else {}
            entry = {token_str(t): lp for t, lp in d.items()}
            if ids[k] not in d:
                entry[token_str(ids[k])] = out.logprobs[k]
            tops.append(entry)
    offsets = []
    for s in toks:
        offsets.append(offset)
        offset += len(s)
    return {
        "tokens": toks,
        "token_logprobs": list(out.logprobs[start:]),
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(token_str: TokenStr, out: RequestOutput, start: int) -> dict[str, Any]:
    """Chat-style logprobs of out's tokens from `start` on (top_logprobs: the k alternatives)."""
    content = []
    for k in range(start, len(out.token_ids)):
        s = token_str(out.token_ids[k])
        top = out.top_logprobs[k] if k < len(out.top_logprobs) else {}
        content.append(
            {
                "token": s,
                "logprob": out.logprobs[k],
                "bytes": list(s.encode()),
                "top_logprobs": [
                    {"token": (ts := token_str(t)), "logprob": lp, "bytes": list(ts.encode())}
                    for t, lp in top.items()
                ],
            }
        )
    return {"content": content, "refusal": None}


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def chat_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def body(meta: ResponseMeta, choices: list[dict[str, Any]], use: dict[str, int]) -> dict:
    return {
        "id": meta.id,
        "object": meta.object,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": use,
        "system_fingerprint": None,
    }


def chunk(meta: ResponseMeta, choice: dict[str, Any] | None, include_usage: bool) -> dict:
    """One stream chunk with one choice (None: the final usage chunk has no choices)."""
    c: dict[str, Any] = {
        "id": meta.id,
        "object": meta.chunk_object,
        "created": meta.created,
        "model": meta.model,
        "choices": [choice] if choice is not None else [],
    }
    if meta.chat:
        c["system_fingerprint"] = None
    if include_usage:
        c["usage"] = None
    return c
