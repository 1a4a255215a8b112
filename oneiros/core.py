"""Plain domain types shared by the scheduler, the memory accounting and the executors.

Nothing here imports torch: the scheduler and the block accounting run on these alone, so they can be
driven by the simulated executor and unit-tested without tensors.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


class OneirosError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(OneirosError, ValueError):
    """The request itself is wrong (bad field, empty prompt, too long): the caller must change it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownModelError(OneirosError, KeyError):
    """A request or a command named a model the engine does not serve."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a readable sentence.
        return str(self.args[0]) if self.args else "unknown model"


class ConfigError(OneirosError, ValueError):
    """A setting cannot work (for example a memory budget too small for the model's weights)."""


class IntegrityError(OneirosError, AssertionError):
    """An accounting invariant does not hold (a bug). Raised, not asserted: integrity checks must
    still run under `python -O`, where assert statements vanish."""


def ensure(condition: object, message: str) -> None:
    """Raise IntegrityError(message) unless condition holds."""
    if not condition:
        raise IntegrityError(message)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next token and when to stop. Mirrors vLLM's names.

    temperature 0 means greedy. top_k 0 (or -1) disables top-k; top_p 1.0 disables nucleus sampling;
    min_p 0 disables the min-p cut (tokens below min_p x the most likely token's probability).
    `logprobs` is the number of top alternatives to report per token besides the chosen one (None:
    none). Penalties follow vLLM: presence and frequency penalties count the generated tokens (subtracted
    from the logits); the repetition penalty covers prompt and generated tokens (a positive logit
    divided by it, a negative one multiplied). `logit_bias` is added to the logits (token id ->
    bias, OpenAI's -100..100); `allowed_token_ids` restricts sampling to those tokens. All of them
    change which token is picked, never the reported log-probabilities (those of the raw model).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # (token id, bias) pairs, sorted by token id; a dict is accepted and converted.
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias
        pairs = bias.items() if isinstance(bias, dict) else bias
        object.__setattr__(self, "logit_bias", tuple(sorted((k, v) for k, v in pairs)))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        self.validate()

    def validate(self) -> None:
        def integer(name: str, value: object) -> None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)

        def number(name: str, value: object) -> float:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                raise InvalidRequestError(f"{name} must be a number, got {value!r}", name)
            return float(value)

        integer("max_tokens", self.max_tokens)
        if self.max_tokens <= 0:
            raise InvalidRequestError(
                f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens"
            )
        if not 0.0 <= number("temperature", self.temperature) <= 100.0:
            raise InvalidRequestError(
                f"temperature must be in [0, 100], got {self.temperature}", "temperature"
            )
        if not 0.0 < number("top_p", self.top_p) <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        integer("top_k", self.top_k)
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1, 0 or positive, got {self.top_k}", "top_k")
        if self.seed is not None:
            integer("seed", self.seed)
            if not -(2**63) <= self.seed < 2**63:
                raise InvalidRequestError("seed must fit in 64 bits", "seed")
        if self.logprobs is not None:
            integer("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= 20:
                raise InvalidRequestError(
                    f"logprobs must be between 0 and 20, got {self.logprobs}", "logprobs"
                )
        if any(not isinstance(t, int) or isinstance(t, bool) for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be integers", "stop_token_ids")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be non-empty strings", "stop")
        if not 0.0 <= number("min_p", self.min_p) <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(name, getattr(self, name)) <= 2.0:
                raise InvalidRequestError(
                    f"{name} must be in [-2, 2], got {getattr(self, name)}", name
                )
        if not 0.0 < number("repetition_penalty", self.repetition_penalty) <= 2.0:
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}",
                "repetition_penalty",
            )
        for token, bias in self.logit_bias:
            integer("logit_bias", token)
            if token < 0 or not -100.0 <= number("logit_bias", bias) <= 100.0:
                raise InvalidRequestError(
                    f"logit_bias maps token ids (>= 0) to biases in [-100, 100], got "
                    f"{token}: {bias}",
                    "logit_bias",
                )
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise InvalidRequestError(
                    "allowed_token_ids must not be empty", "allowed_token_ids"
                )
            for token in self.allowed_token_ids:
                integer("allowed_token_ids", token)
                if token < 0:
                    raise InvalidRequestError(
                        "allowed_token_ids must be non-negative", "allowed_token_ids"
                    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the logits change before the pick (penalties, bias, allowed tokens)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.allowed_token_ids is not None
        )


class RequestStatus(enum.IntEnum):
    """Ordered: every finished state sorts after the live ones."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


_ids = itertools.count()
_order = itertools.count()  # creation order: breaks ties between equal arrival times


@dataclass(slots=True, eq=False)
class Request:
    """One generation request and everything the engine tracks about it.

    Token bookkeeping follows vLLM v1: `num_computed_tokens` catches up with `len(all_token_ids)`;
    a step schedules `num_tokens - num_computed_tokens` (or a chunk of it) new tokens.
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    model: str = "default"
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival_time: float = field(default_factory=time.perf_counter)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # KV swapped out to host memory, per block of the table it had: a host block, or None for a
    # block shared with other requests when it was swapped out (it is found again in the prefix
    # cache on resume, or recomputed).
    host_block_ids: list[int | None] = field(default_factory=list)
    # Hashes of the first full blocks of prompt + output (prefix caching; computed once, on demand).
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    stop_reason: str | int | None = None
    output_text: str = ""
    order: int = field(default_factory=lambda: next(_order))

    @property
    def age_key(self) -> tuple[float, int]:
        """Sorts older requests first (arrival time, then creation order): a total order, so of
        two requests one is always the younger."""
        return self.arrival_time, self.order

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt and output tokens as one new list (a copy: use `token`/`tokens` per step)."""
        return self.prompt_token_ids + self.output_token_ids

    def token(self, i: int) -> int:
        """Token i of prompt + output, without building the joined list."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens start..stop-1 of prompt + output (only that slice is copied)."""
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def first_token_time(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def finished(self) -> bool:
        return self.status.finished


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """One request's share of a step: `num_new_tokens` tokens starting at `start`."""

    request: Request
    start: int  # index of the first new token in request.all_token_ids
    num_new_tokens: int

    @property
    def context_len(self) -> int:
        """Tokens whose K/V are visible to the last new token after this step (cache + new)."""
        return self.start + self.num_new_tokens

    @property
    def attn_pairs(self) -> int:
        """(query, key) pairs attended this step: causal inside the chunk, all of the prefix."""
        q = self.num_new_tokens
        return q * self.context_len - q * (q - 1) // 2

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a new token is sampled."""
        return self.context_len == self.request.num_tokens


# ---- memory actions: planning decides them as data, the executor applies (or prices) them ------
@dataclass(frozen=True, slots=True)
class EvictLayer:
    """Remap: a decoder layer gives up its slab; `pages` go free for KV cache. No write-back: the
    host master copy is exact."""

    model: str
    layer: int
    pages: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RestoreLayer:
    """A non-resident layer gets a slab on `pages` again: one host-to-device copy of its master."""

    model: str
    layer: int
    pages: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MoveLayer:
    """Compaction: a resident layer's slab moves from `src` to `pages`, copied again from the host
    master copy (so old and new places may overlap)."""

    model: str
    layer: int
    src: tuple[int, ...]
    pages: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ResizeKV:
    """A KV pool took (`grow`) or gave back pages. Bookkeeping only for the executor: KV views span
    the whole arena, so no byte moves."""

    model: str
    pages: tuple[int, ...]
    grow: bool


@dataclass(frozen=True, slots=True)
class MoveKV:
    """Compaction of KV cache: the pages `src` of a model's KV pool move to the free pages `pages`
    (one device-to-device copy each; blocks keep their slot, so block page*bpp+s becomes
    new_page*bpp+s in every request and in the prefix cache). Planned only before any KV swap
    of its step, and executed before them (the swaps' block ids already name the new pages)."""

    model: str
    src: tuple[int, ...]
    pages: tuple[int, ...]


MemoryOp = EvictLayer | RestoreLayer | MoveLayer | ResizeKV | MoveKV
LAYER_COPIES = (RestoreLayer, MoveLayer)  # ops that copy one layer host-to-device


@dataclass(slots=True)
class StepPlan:
    """One model's share of a step: which requests run with how many tokens, the KV block copies
    around them, and the layers its pass streams."""

    model: str
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    recomputed_tokens: int = 0  # computed tokens the recompute preemptions of this plan dropped
    # Prefix caching: tokens of the requests admitted without computed tokens (new, or preempted
    # by recompute), and how many of them were found in the cache (their prefill is skipped).
    prefix_queries: int = 0
    prefix_hits: int = 0
    # KV block copies to run before the forward pass, as (device block, host block) pairs.
    # Swap-outs run first: their device blocks may be handed to another request in this step.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    # The model's non-resident layers in this pass: streamed through borrowed slabs
    # (`memory.passplan.plan_pass` says which copy starts when).
    stream: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens of prompt chunks, and of chunks of several tokens anywhere (a recomputed
        request catching up with its outputs, possibly from a cached prefix); the rest are
        decodes, one token of one sequence."""
        return sum(
            s.num_new_tokens for s in self.seqs
            if s.start < s.request.num_prompt_tokens or s.num_new_tokens > 1
        )

    @property
    def empty(self) -> bool:
        """Nothing to execute: no pass and no KV copy."""
        return not self.seqs and not self.swap_out and not self.swap_in


@dataclass(slots=True)
class Step:
    """One engine step as data: plan -> execute -> commit.

    The executor applies the KV page moves of `memory` (planned before any swap), every plan's
    swap-outs, then the rest of `memory` in order (the order planning made each decision, so every
    action sees the pages as the accounting had them), then the swap-ins, then runs the plans'
    passes. `idle` plans only preempted (no copy, no pass): commit and trace
    read them. `finished` are requests planning gave up on; `notes` tally decisions that are not
    memory actions (failed restores, reactivations), per (model, counter name)."""

    now: float
    plans: list[StepPlan] = field(default_factory=list)
    memory: list[MemoryOp] = field(default_factory=list)
    idle: list[StepPlan] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    notes: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def empty(self) -> bool:
        """Nothing to execute: no pass, no copy, no memory action."""
        return not self.plans and not self.memory


@dataclass(slots=True)
class StepResult:
    """What the executor returns: one sampled token (and its log-probability) per sampling seq."""

    request_ids: list[str]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None = None
    elapsed: float = 0.0
    # Layer streaming during this step (parameter remapping): bytes copied host-to-device, time spent
    # copying, and the part of it the compute had to wait for.
    h2d_bytes: int = 0
    copy_s: float = 0.0
    exposed_s: float = 0.0
    # False: the pass streamed inside a replayed CUDA graph, where copies and waits are not timed
    # (copy_s and exposed_s say nothing, and elapsed holds the waits); the controller skips it.
    timed: bool = True


class Prefix(Sequence):
    """The first n items of an append-only list, shared rather than copied: a step's output of a
    request sees its tokens as they were at that step (later appends stay out of it), and making
    one costs O(1) instead of a copy of everything generated so far."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list, n: int | None = None) -> None:
        self._items = items
        self._n = len(items) if n is None else n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            if step > 0:  # the clamped bounds mean the same in the longer list
                return self._items[start:stop:step]
            return [self._items[k] for k in range(start, stop, step)]
        if not -self._n <= i < self._n:
            raise IndexError("index out of range")
        return self._items[i % self._n]

    def __iter__(self):
        return itertools.islice(self._items, self._n)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Prefix, list, tuple)):
            return len(other) == self._n and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass(slots=True)
class RequestOutput:
    """What the engine hands back for a request after a step (final when `finished`)."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    token_ids: Sequence[int]  # lists, or Prefix views of the request's own lists (no copy)
    text: str
    logprobs: Sequence[float]
    top_logprobs: Sequence[dict[int, float]]
    finished: bool
    finish_reason: str | None
    arrival_time: float
    token_times: Sequence[float]
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def tbt(self) -> list[float]:
        """Gaps between consecutive tokens, seconds."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]
