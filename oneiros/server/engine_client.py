"""The engine as the HTTP layer sees it: `EngineClient`, the interface every route, formatter and
stream is written against, and the errors it raises.

`AsyncLLMEngine` (one engine on a thread of this process) implements it; an ingress that forwards
requests to engine replicas elsewhere implements the same methods and reuses the routes unchanged.
Requests arrive already tokenised (the HTTP layer tokenises off the engine's thread), so a client
never sees text it has to encode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from oneiros.core import RequestOutput, SamplingParams


class EngineError(RuntimeError):
    """A request in flight could not be completed by the engine (not the caller's fault)."""


class EngineStepError(EngineError):
    """An engine step that ran this request raised; the request was ended and its blocks freed."""


class EngineShutdownError(EngineError):
    """The engine is shutting down: it admits nothing new, or it aborted this request on the way
    out."""


class EngineDeadError(EngineError):
    """The engine's loop stopped for good (it crashed): nothing more will be served."""


class OutputStream(Protocol):
    """One request's outputs: cumulative RequestOutputs, the last one `finished`. Iterating raises
    an EngineError if the engine ends the request. `close()` aborts it if unfinished
    (idempotent)."""

    request_id: str
    submit_time: float  # time.perf_counter() at submission: the clock of RequestOutput.token_times

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineHealth:
    """state: 'ok' | 'starting' | 'draining' (admits nothing new) | 'dead' (the loop crashed:
    `error` says how)."""

    state: str
    error: str | None = None
    steps: int = 0
    step_errors: int = 0
    last_step_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"


class EngineClient(ABC):
    """What the HTTP layer needs from an engine, wherever it runs."""

    @property
    @abstractmethod
    def model_names(self) -> list[str]:
        """The served models, in a stable order."""

    @abstractmethod
    def max_model_len(self, model: str) -> int:
        """Context window of `model` in tokens (prompt plus completion)."""

    @abstractmethod
    def vocab_size(self, model: str) -> int:
        """Token ids of `model` are in [0, vocab_size)."""

    @abstractmethod
    def tokenizer(self, model: str) -> Any | None:
        """A Hugging Face tokenizer of `model` that the caller owns (a private copy: it may be used
        on any one thread of the caller's), or None when the model has none."""

    @property
    @abstractmethod
    def is_accepting(self) -> bool:
        """Whether new requests are admitted."""

    @abstractmethod
    def health(self) -> EngineHealth: ...

    @abstractmethod
    async def add_request(
        self,
        prompt: list[int],
        params: SamplingParams,
        model: str,
        request_id: str | None = None,
    ) -> OutputStream:
        """Queue a tokenised request; returns once the engine accepted it (errors in the request
        raise here, before any output)."""

    @abstractmethod
    def abort_nowait(self, request_id: str) -> None:
        """Queue an abort of a request (its blocks are freed before the engine's next step)."""

    @abstractmethod
    async def memory_snapshot(self) -> dict[str, Any]:
        """The arena and per-model state as JSON-ready data (see `metrics.memory_snapshot`)."""

    @abstractmethod
    async def check_integrity(self) -> str:
        """'ok', or 'failed: <what>' when the engine's accounting is inconsistent."""

    @abstractmethod
    def start(self) -> None:
        """Start (or restart) serving; idempotent."""

    @abstractmethod
    def begin_shutdown(self) -> None:
        """Stop admitting without waiting."""

    @abstractmethod
    async def shutdown(self, timeout: float = 30.0) -> int:
        """Drain up to `timeout` seconds, abort the rest, stop. Returns how many were aborted."""
