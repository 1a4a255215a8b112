"""Server-sent events: the streamed body of a completion or chat completion (every choice
interleaved, text held back while it could still become a stop string, usage at the end, an error
event if the engine ends the request) and the response that runs it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from oneiros.server import formatting as fmt
from oneiros.server.engine_client import EngineError
from oneiros.server.errors import stream_error
from oneiros.server.generation import Generation

logger = logging.getLogger("oneiros.server")


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always watches for the client going away (and then cancels the body)
    and always runs `on_close` at the end, even when the body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def run_stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-send
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(run_stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                self._on_close()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


def holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could be the start of a stop string: streamed text
    holds it back until the next tokens show whether the stop string completes."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _Choice:
    __slots__ = ("sent_text", "sent_tokens", "offset")

    def __init__(self, offset: int = 0) -> None:
        self.sent_text = ""
        self.sent_tokens = 0
        self.offset = offset  # text offset of the generated text (after an echoed prompt)


async def stream_events(
    gen: Generation,
    meta: fmt.ResponseMeta,
    token_str: fmt.TokenStr,
    stops: Sequence[str],
    want_logprobs: bool,
    include_usage: bool,
    n: int = 1,
    echo: Sequence[str] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of `gen`: chat deltas or completion texts per choice, then usage, then
    [DONE]. `echo[k]` is sent first as choice k's text (completions' echo)."""
    choices = [_Choice(len(echo[k]) if echo else 0) for k in range(len(gen.streams))]
    try:
        for k in range(len(choices)):
            if meta.chat:
                delta = {"role": "assistant", "content": ""}
                yield sse(fmt.chunk(meta, {"index": k, "delta": delta, "logprobs": None,
                                           "finish_reason": None}, include_usage))
            elif echo and echo[k]:
                yield sse(fmt.chunk(meta, fmt.completion_choice(k, echo[k], None, None),
                                    include_usage))
        async for k, out in gen.outputs():
            for event in _choice_events(meta, token_str, choices[k], k, out, stops,
                                        want_logprobs, include_usage):
                yield event
        if include_usage:
            finals = [f for f in gen.finals if f is not None]
            last = fmt.chunk(meta, None, False)
            last["usage"] = fmt.total_usage(finals, n)
            yield sse(last)
        yield DONE
    except EngineError as e:
        gen.status = type(e).__name__
        yield sse(stream_error(e))
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        gen.status = "client disconnected"
        raise
    except Exception as e:
        logger.exception("[%s] stream failed", gen.rid)
        gen.status = "internal error"
        yield sse(stream_error(e))
        yield DONE


def _choice_events(
    meta: fmt.ResponseMeta,
    token_str: fmt.TokenStr,
    c: _Choice,
    k: int,
    out: Any,
    stops: Sequence[str],
    want_logprobs: bool,
    include_usage: bool,
) -> list[str]:
    text = out.text
    if not out.finished:
        text = text[: len(text) - holdback(text, stops)]
    delta = text[len(c.sent_text):] if len(text) > len(c.sent_text) else ""
    c.sent_text = text if len(text) > len(c.sent_text) else c.sent_text
    lp = None
    if want_logprobs and len(out.token_ids) > c.sent_tokens:
        if meta.chat:
            lp = fmt.chat_logprobs(token_str, out, c.sent_tokens)
        else:
            offset = c.offset + len(c.sent_text) - len(delta)
            lp = fmt.completion_logprobs(token_str, out, c.sent_tokens, offset)
    c.sent_tokens = len(out.token_ids)
    finish = out.finish_reason if out.finished else None
    events = []
    if meta.chat:
        if delta or lp:
            choice = {"index": k, "delta": {"content": delta}, "logprobs": lp,
                      "finish_reason": None}
            events.append(sse(fmt.chunk(meta, choice, include_usage)))
        if finish:
            choice = {"index": k, "delta": {}, "logprobs": None, "finish_reason": finish}
            events.append(sse(fmt.chunk(meta, choice, include_usage)))
    elif delta or lp or finish:
        events.append(sse(fmt.chunk(meta, fmt.completion_choice(k, delta, finish, lp),
                                    include_usage)))
    return events
