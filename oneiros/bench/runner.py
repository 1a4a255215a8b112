"""Replay a workload against an engine (in process) or a server (over HTTP), and compare policies.

In process, `run_engine` drives an `LLMEngine` on the engine's own clock: requests are added when
their arrival time has come (with that time as their arrival, so queueing counts in TTFT), the
engine steps while it has work, and when it is idle the clock waits for the next arrival (a real
engine sleeps; a simulated engine's virtual clock jumps). `run_http` sends the same workload to any
OpenAI-compatible server as streaming completions. Both return a `RunResult`; `run_policies` runs
one workload under several policies and `compare` sets their summaries side by side.

Every request sends a prompt of random token ids (deterministic per seed and request index, the
same for every policy) and forces its output length: max_tokens = output_len, ignore_eos, greedy.
In process, a caller may choose each request's prompt and sampling parameters, and keep the
tokens each request generated (with their log-probabilities) to compare outputs across runs. A
later turn of a conversation (`WorkItem.follows`, in process only) is sent once the turn before
it finished, its prompt that turn's prompt and output followed by its own new tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import heapq
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from oneiros.bench.metrics import (
    HEADLINE_METRICS,
    RequestRecord,
    lookup,
    ratio,
    summarize,
    vllm_fields,
)
from oneiros.bench.workloads import WorkItem, fit_context
from oneiros.core import OneirosError, SamplingParams

if TYPE_CHECKING:
    import httpx

    from oneiros.engine.engine import LLMEngine

PROMPT_TOKEN_LOW = 100  # below this sit the special tokens of every vocabulary we serve
HTTP_VOCAB_SIZE = 512  # over HTTP the vocabulary is unknown: ids below this fit every model

PromptFactory = Callable[[int, WorkItem], list[int]]
ParamsFactory = Callable[[int, WorkItem], SamplingParams]


# ---- results -------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestTokens:
    """What one request generated: its token ids, the log-probability of each, and per token the
    top alternatives the engine reported ({token id: log-probability}; empty dicts unless the
    request asked for `SamplingParams.logprobs`)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_ids": list(self.token_ids),
            "logprobs": list(self.logprobs),
            "top_logprobs": [{str(t): lp for t, lp in top.items()} for top in self.top_logprobs],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestTokens:
        return cls(
            token_ids=[int(t) for t in d["token_ids"]],
            logprobs=[float(x) for x in d["logprobs"]],
            top_logprobs=[
                {int(t): float(lp) for t, lp in top.items()} for top in d["top_logprobs"]
            ],
        )


@dataclass
class RunResult:
    """One run of a workload. Times are seconds relative to the start of the run.

    `records` follow the workload's order and omit rejected requests; `rejected` counts rejections
    by kind (the error class, and the parameter it names); `counters` are each model's engine
    counters accumulated during the run (empty over HTTP); `page_history` is the arena's pages by
    owner ('free', '<model>/kv', '<model>/slab', '<model>/resident') after each busy step. `wall_s`
    is wall-clock time, `clock_s` engine-clock time (they differ under a simulated clock).
    `outputs` holds, by workload index, what each finished request generated (filled only when
    `run_engine` was asked to keep tokens)."""

    records: list[RequestRecord]
    counters: dict[str, dict[str, float]] = field(default_factory=dict)
    page_history: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    rejected_examples: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    clock_s: float = 0.0
    num_pages: int | None = None
    page_bytes: int | None = None
    policy: str | None = None
    target: str = "engine"  # 'engine' or the server's URL
    clipped: int = 0  # requests shortened to fit their model's context window (overlong="clip")
    outputs: dict[int, RequestTokens] = field(default_factory=dict)

    def engine_totals(self) -> dict[str, float]:
        """Counters summed over models (preemptions, remapped_layers, h2d_bytes, ...)."""
        totals: Counter[str] = Counter()
        for counters in self.counters.values():
            totals.update(counters)
        return dict(totals)

    def summary(
        self,
        slo_ttft_s: float | None = None,
        slo_tbt_s: float | None = None,
        duration_s: float | None = None,
    ) -> dict[str, Any]:
        """`metrics.summarize` of the records, plus rejections and (in process) the engine's
        counter totals under 'engine'."""
        out = summarize(self.records, duration_s, slo_ttft_s, slo_tbt_s)
        out["rejected"] = sum(self.rejected.values())
        out["rejected_by_kind"] = dict(self.rejected)
        out["clipped"] = self.clipped
        out["vllm"] = vllm_fields(self.records, out["duration_s"])
        out["vllm"]["failed"] += out["rejected"]
        out["engine"] = self.engine_totals() if self.counters else None
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "target": self.target,
            "wall_s": self.wall_s,
            "clock_s": self.clock_s,
            "num_pages": self.num_pages,
            "page_bytes": self.page_bytes,
            "rejected": dict(self.rejected),
            "rejected_examples": dict(self.rejected_examples),
            "clipped": self.clipped,
            "counters": self.counters,
            "page_history": [[t, dict(u)] for t, u in self.page_history],
            "records": [r.to_dict() for r in self.records],
            "outputs": {str(k): o.to_dict() for k, o in self.outputs.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunResult:
        """The inverse of `to_dict` (e.g. to re-plot a saved report)."""
        return cls(
            records=[RequestRecord.from_dict(r) for r in d["records"]],
            counters={m: dict(c) for m, c in d.get("counters", {}).items()},
            page_history=[(float(t), dict(u)) for t, u in d.get("page_history", [])],
            rejected=dict(d.get("rejected", {})),
            rejected_examples=dict(d.get("rejected_examples", {})),
            wall_s=d.get("wall_s", 0.0),
            clock_s=d.get("clock_s", 0.0),
            num_pages=d.get("num_pages"),
            page_bytes=d.get("page_bytes"),
            policy=d.get("policy"),
            target=d.get("target", "engine"),
            clipped=d.get("clipped", 0),
            outputs={int(k): RequestTokens.from_dict(o) for k, o in d.get("outputs", {}).items()},
        )


class _Rejections:
    """Counts of rejected requests by kind, with the first message of each kind."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, message)


def rejection_kind(error: BaseException) -> str:
    """'InvalidRequestError(prompt)': the error's class and, when it names one, the parameter."""
    param = getattr(error, "param", None)
    return f"{type(error).__name__}({param})" if param else type(error).__name__


# ---- prompts -------------------------------------------------------------------------------------


def random_prompt(
    index: int, length: int, seed: int = 0, low: int = PROMPT_TOKEN_LOW, high: int = 512
) -> list[int]:
    """`length` token ids in [low, high), a function of (seed, index) only: request k gets the same
    prompt under every policy and in every run with the same seed."""
    if high - low < 1:
        low = 0
    rng = np.random.default_rng([seed & 0xFFFFFFFF, index])
    return rng.integers(low, high, size=length).tolist()


def forced_params(item: WorkItem) -> SamplingParams:
    """Exactly `output_len` tokens: greedy, EOS ignored."""
    return SamplingParams(max_tokens=item.output_len, temperature=0.0, ignore_eos=True)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar (or a do-nothing stand-in when tqdm is missing or progress is off)."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="req", leave=False)
        except ImportError:
            pass
    return _NoProgress()


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


# ---- in process ----------------------------------------------------------------------------------


def check_models(workload: Sequence[WorkItem], served: Sequence[str]) -> None:
    """Refuse a workload that names tenants the engine does not serve: every such request would be
    rejected, which is a setup mistake rather than a result."""
    unknown = sorted({w.model for w in workload} - set(served))
    if unknown:
        raise ValueError(
            f"the workload sends requests to {', '.join(unknown)}, which the engine does not serve "
            f"(served: {', '.join(served)}); map tenant names with workloads.rename_models"
        )


def run_engine(
    engine: LLMEngine,
    workload: Sequence[WorkItem],
    *,
    prompt_seed: int = 0,
    make_prompt: PromptFactory | None = None,
    make_params: ParamsFactory | None = None,
    keep_tokens: bool = False,
    progress: bool = True,
    policy: str | None = None,
    max_steps: int | None = None,
    overlong: str = "clip",
) -> RunResult:
    """Replay `workload` on an in-process engine and measure every request.

    Arrivals are offsets from the engine clock at the start; each request is added once its time
    has come, with that time as its arrival. Prompts come from `make_prompt(index, item)`, by
    default `random_prompt` with ids in [100, smallest vocabulary), and sampling parameters from
    `make_params(index, item)`, by default `forced_params` (the item as it is sent: after any
    clipping). With `keep_tokens`, `outputs` keeps each finished request's tokens and
    log-probabilities by workload index (ask for `logprobs` in the parameters to get the top
    alternatives too). Requests the engine refuses at
    add time are counted in `rejected`, not raised. `max_steps` bounds the number of engine steps
    (a RuntimeError beyond it) to catch an engine that stops making progress. A request whose
    prompt and output do not fit its model's context window is shortened to fit
    (`overlong="clip"`, counted in `clipped`: the paper served the Azure traces on 2,048-position
    models this way) or refused (`"reject"`, counted in `rejected` as 'context')."""
    if overlong not in ("clip", "reject"):
        raise ValueError(f"overlong must be clip or reject, not {overlong!r}")
    check_models(workload, engine.model_names)
    if make_prompt is None:
        high = min(t.model.cfg.vocab_size for t in engine.tenants.values())
        make_prompt = lambda k, w: random_prompt(k, w.prompt_len, prompt_seed, high=high)  # noqa: E731
    before = _counters(engine)
    bar = _progress(len(workload), progress, policy or "run")
    wall0 = time.perf_counter()
    replay = _Replay(engine, workload, make_prompt, bar, overlong, make_params, keep_tokens)
    try:
        replay.run(max_steps)
    finally:
        bar.close()
    t0 = replay.t0
    return RunResult(
        records=[replay.records[k] for k in sorted(replay.records)],
        counters=_counter_delta(before, _counters(engine)),
        page_history=_pages_since(engine, t0),
        rejected=dict(replay.rejections.counts),
        rejected_examples=replay.rejections.examples,
        wall_s=time.perf_counter() - wall0,
        clock_s=engine.clock.now() - t0,
        num_pages=engine.arena.num_pages,
        page_bytes=engine.arena.page_bytes,
        policy=policy if policy is not None else getattr(engine.config, "policy", None),
        clipped=replay.clipped,
        outputs={k: replay.outputs[k] for k in sorted(replay.outputs)},
    )


class _Replay:
    """The state of one in-process replay: requests not yet due, requests in the engine, records
    of finished ones and rejections. Time t0 is the engine clock when the replay starts.

    Requests wait in a heap by due time (engine clock). A later turn of a conversation
    (`WorkItem.follows`) enters it only when the turn before it finished, due at its own arrival
    or then, whichever is later; its prompt is that turn's prompt and output, then its own."""

    def __init__(
        self,
        engine: LLMEngine,
        workload: Sequence[WorkItem],
        make_prompt: PromptFactory,
        bar: Any,
        overlong: str = "clip",
        make_params: ParamsFactory | None = None,
        keep_tokens: bool = False,
    ) -> None:
        self.engine = engine
        self.overlong = overlong
        self.clipped = 0
        self.make_prompt = make_prompt
        self.make_params = make_params or (lambda k, item: forced_params(item))
        self.keep_tokens = keep_tokens
        self.outputs: dict[int, RequestTokens] = {}
        self.bar = bar
        self.t0 = engine.clock.now()
        self.workload = workload
        self.pending: list[tuple[float, int]] = []  # (due time, index), a heap
        self.next_turns: dict[int, list[int]] = {}  # turn -> the turns that follow it
        for k, w in enumerate(workload):
            if w.follows is None:
                self.pending.append((self.t0 + w.arrival_s, k))
            elif not 0 <= w.follows < len(workload) or w.follows == k:
                raise ValueError(f"request {k} follows {w.follows}, which is not another request")
            else:
                self.next_turns.setdefault(w.follows, []).append(k)
        heapq.heapify(self.pending)
        self.history: dict[int, list[int]] = {}  # a finished turn's prompt + output, while needed
        self.prompts: dict[str, list[int]] = {}  # prompts of live requests that others follow
        self.live: dict[str, tuple[int, WorkItem]] = {}
        self.records: dict[int, RequestRecord] = {}
        self.rejections = _Rejections()

    def due(self) -> float | None:
        """Engine-clock time of the next request to add, None when none is waiting to be added."""
        return self.pending[0][0] if self.pending else None

    def run(self, max_steps: int | None) -> None:
        steps = 0
        while self.due() is not None or self.engine.has_unfinished():
            self.add_due(self.engine.clock.now())
            if self.engine.has_unfinished():
                self.step()
                steps += 1
                if max_steps is not None and steps > max_steps:
                    raise RuntimeError(f"the workload did not finish in {max_steps} engine steps")
            elif (t := self.due()) is not None:
                # Idle until the next arrival: remapped layers come back meanwhile (the server's
                # idle loop does the same), their copies overlapping the wait.
                self.engine.revert_idle()
                self.engine.clock.wait_until(t)

    def add_due(self, now: float) -> None:
        """Add every request whose time has come; a refusal is counted, not raised."""
        while (t := self.due()) is not None and t <= now:
            _, k = heapq.heappop(self.pending)
            self.add(k, self.workload[k], t)

    def add(self, k: int, item: WorkItem, t: float) -> None:
        prompt = self.make_prompt(k, item)
        if item.follows is not None:
            prompt = self.history.pop(k) + prompt
            item = replace(item, prompt_len=len(prompt))
        window = self.engine.tenants[item.model].max_model_len
        if item.prompt_len + item.output_len > window:
            if self.overlong == "reject":
                self.reject(k, "context", f"{item.prompt_len} + {item.output_len} tokens do not "
                            f"fit the {window}-token context of model {item.model!r}")
                return
            plen, olen = fit_context(item.prompt_len, item.output_len, window)
            item = replace(item, prompt_len=plen, output_len=olen)
            prompt = prompt[:plen]
            self.clipped += 1
        try:
            req = self.engine.add_request(
                prompt, self.make_params(k, item), item.model, arrival_time=t
            )
        except OneirosError as e:
            self.reject(k, rejection_kind(e), str(e))
            return
        self.live[req.request_id] = (k, item)
        if k in self.next_turns:
            self.prompts[req.request_id] = prompt

    def reject(self, k: int, kind: str, message: str) -> None:
        """Count a refused request; the turns that follow it are refused with it."""
        self.rejections.add(kind, message)
        self.bar.update()
        for j in self.next_turns.pop(k, []):
            self.reject(j, "session", f"request {j} follows request {k}, which was refused")

    def step(self) -> None:
        for out in self.engine.step():
            if out.finished and out.request_id in self.live:
                k, item = self.live.pop(out.request_id)
                self.records[k] = _record(out, item, self.t0)
                if self.keep_tokens:
                    self.outputs[k] = RequestTokens(
                        list(out.token_ids), list(out.logprobs), [dict(d) for d in out.top_logprobs]
                    )
                self.bar.update()
                prompt = self.prompts.pop(out.request_id, None)
                for j in self.next_turns.pop(k, []):
                    self.history[j] = [*prompt, *out.token_ids]  # type: ignore[misc]
                    t = max(self.t0 + self.workload[j].arrival_s, self.engine.clock.now())
                    heapq.heappush(self.pending, (t, j))


def _record(out: Any, item: WorkItem, t0: float) -> RequestRecord:
    """A finished RequestOutput as a record, times relative to the run's start."""
    return RequestRecord(
        model=out.model,
        arrival=out.arrival_time - t0,
        token_times=[t - t0 for t in out.token_times],
        prompt_len=item.prompt_len,
        output_len=len(out.token_ids),
        preemptions=out.num_preemptions,
        finish_reason=out.finish_reason,
    )


def _counters(engine: LLMEngine) -> dict[str, dict[str, float]]:
    return {n: dataclasses.asdict(s.counters) for n, s in engine.store.states.items()}


def _counter_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """What each counter gained during the run (an engine may be reused for several runs)."""
    return {
        m: {k: v - before.get(m, {}).get(k, 0) for k, v in c.items() if isinstance(v, (int, float))}
        for m, c in after.items()
    }


def _pages_since(engine: LLMEngine, t0: float) -> list[tuple[float, dict[str, int]]]:
    """The page history from t0 on, relative to t0, starting with the state at t0 (the last entry
    recorded before the run)."""
    history = list(engine.store.page_history)
    earlier = [u for t, u in history if t < t0]
    out = [(0.0, dict(earlier[-1]))] if earlier else []
    out += [(t - t0, dict(u)) for t, u in history if t >= t0]
    return out


# ---- over HTTP -----------------------------------------------------------------------------------


def run_http(url: str, workload: Sequence[WorkItem], *args: Any, **kwargs: Any) -> RunResult:
    """Replay `workload` against an OpenAI-compatible server (`url`, with or without /v1) as
    streaming /v1/completions: `run_http_async` with the same arguments, in a fresh event loop."""
    return asyncio.run(run_http_async(url, workload, *args, **kwargs))


async def run_http_async(
    url: str,
    workload: Sequence[WorkItem],
    api_key: str | None = None,
    concurrency_limit: int | None = None,
    *,
    prompt_seed: int = 0,
    make_prompt: PromptFactory | None = None,
    vocab_size: int = HTTP_VOCAB_SIZE,
    count_tokens_by_logprobs: bool = True,
    timeout_s: float = 600.0,
    progress: bool = True,
    policy: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> RunResult:
    """Each request is sent at its arrival time (client clock, time.perf_counter) as a streaming
    completion: the prompt as token ids, max_tokens = output_len, temperature 0, ignore_eos, and
    stream_options.include_usage. With `concurrency_limit`, at most that many are in flight; a
    request waiting for a slot is already late, and its TTFT counts from its scheduled arrival.

    Each SSE chunk is timestamped on arrival and counts as many tokens as its logprobs list
    (logprobs=0 is requested so that every token is visible even when its text is empty; without
    `count_tokens_by_logprobs`, a chunk with text counts as one token). When the final usage
    reports more completion tokens than were counted, the missing ones get the last chunk's time.
    HTTP errors, error events in the stream and connection failures are counted in `rejected`."""
    import httpx

    if any(w.follows is not None for w in workload):
        raise ValueError("conversation turns (WorkItem.follows) are replayed in process only")
    if make_prompt is None:
        make_prompt = lambda k, w: random_prompt(k, w.prompt_len, prompt_seed, high=vocab_size)  # noqa: E731
    base = url.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency_limit) if concurrency_limit else None
    rejections = _Rejections()
    bar = _progress(len(workload), progress, policy or "http")
    wall0 = t0 = time.perf_counter()
    async with httpx.AsyncClient(
        base_url=base,
        headers=headers,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=concurrency_limit, max_keepalive_connections=None),
        transport=transport,
    ) as client:

        async def one(k: int, item: WorkItem) -> RequestRecord | None:
            await asyncio.sleep(max(0.0, t0 + item.arrival_s - time.perf_counter()))
            try:
                if limit is None:
                    return await _stream_one(client, k, item, t0, make_prompt, rejections,
                                             count_tokens_by_logprobs)
                async with limit:
                    return await _stream_one(client, k, item, t0, make_prompt, rejections,
                                             count_tokens_by_logprobs)
            finally:
                bar.update()

        try:
            done = await asyncio.gather(*(one(k, w) for k, w in enumerate(workload)))
        finally:
            bar.close()
    end = time.perf_counter()
    return RunResult(
        records=[r for r in done if r is not None],
        rejected=dict(rejections.counts),
        rejected_examples=rejections.examples,
        wall_s=end - wall0,
        clock_s=end - t0,
        policy=policy,
        target=url,
    )


async def _stream_one(
    client: httpx.AsyncClient,
    k: int,
    item: WorkItem,
    t0: float,
    make_prompt: PromptFactory,
    rejections: _Rejections,
    by_logprobs: bool,
) -> RequestRecord | None:
    import httpx

    body: dict[str, Any] = {
        "model": item.model,
        "prompt": make_prompt(k, item),
        "max_tokens": item.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if by_logprobs:
        body["logprobs"] = 0
    times: list[float] = []
    last_chunk = 0.0  # arrival of the last chunk that carried a choice
    usage: dict[str, Any] | None = None
    finish: str | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                kind, message = _http_error(response.status_code, response.text)
                rejections.add(kind, message)
                return None
            async for line in response.aiter_lines():
                event = _sse_data(line)
                if event is None:
                    continue
                if event == "[DONE]":
                    break
                now = time.perf_counter() - t0
                chunk = json.loads(event)
                if "error" in chunk:
                    kind, message = _error_fields(chunk)
                    rejections.add(f"stream error {kind}", message)
                    return None
                for choice in chunk.get("choices") or []:
                    times += [now] * _chunk_tokens(choice, by_logprobs)
                    finish = choice.get("finish_reason") or finish
                    last_chunk = now
                usage = chunk.get("usage") or usage
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rejections.add(type(e).__name__, str(e) or repr(e))
        return None
    generated = usage.get("completion_tokens") if usage else None
    if generated is not None and len(times) != generated:
        times = (times + [last_chunk] * generated)[:generated]
    return RequestRecord(
        model=item.model,
        arrival=item.arrival_s,
        token_times=times,
        prompt_len=item.prompt_len,
        output_len=len(times),
        finish_reason=finish,
    )


def _sse_data(line: str) -> str | None:
    """The payload of an SSE 'data:' line; None for anything else (comments, blank lines)."""
    if not line.startswith("data:"):
        return None
    return line[len("data:") :].strip()


def _chunk_tokens(choice: dict[str, Any], by_logprobs: bool) -> int:
    """How many generated tokens a streamed completion choice carries."""
    logprobs = choice.get("logprobs")
    if by_logprobs and isinstance(logprobs, dict) and logprobs.get("tokens") is not None:
        return len(logprobs["tokens"])
    return 1 if choice.get("text") else 0


def _error_fields(body: Any) -> tuple[str, str]:
    """(type or code, message) of an OpenAI-style error body."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "unknown", str(body)[:200]
    return str(error.get("type") or error.get("code") or "unknown"), str(error.get("message", ""))


def _http_error(status: int, text: str) -> tuple[str, str]:
    try:
        kind, message = _error_fields(json.loads(text))
    except json.JSONDecodeError:
        kind, message = "unknown", text[:200]
    return f"HTTP {status} {kind}", message


# ---- several policies ----------------------------------------------------------------------------


def run_policies(
    make_engine: Callable[[str], LLMEngine],
    policies: Sequence[str],
    workload: Sequence[WorkItem],
    **run_kwargs: Any,
) -> dict[str, RunResult]:
    """Run the same workload on a fresh engine per policy (`make_engine(policy)`), one after the
    other; each engine is closed and dropped before the next is built, so that two never hold
    device memory at once. Keyword arguments go to `run_engine`."""
    results: dict[str, RunResult] = {}
    for policy in policies:
        engine = make_engine(policy)
        try:
            results[policy] = run_engine(engine, workload, policy=policy, **run_kwargs)
        finally:
            engine.close()
            del engine
            gc.collect()
    return results


def compare(
    results: Mapping[str, RunResult],
    slo_ttft_s: float | None = None,
    slo_tbt_s: float | None = None,
) -> dict[str, Any]:
    """Summaries of every run and, for each headline metric (metrics.HEADLINE_METRICS), the ratio
    of each run to the first one (the baseline): below 1 is better for latencies, preemptions and
    remaps, above 1 for throughput and goodput. A ratio is None where a value is missing or the
    baseline is 0 (1.0 when both are 0)."""
    if not results:
        raise ValueError("nothing to compare")
    summaries = {name: r.summary(slo_ttft_s, slo_tbt_s) for name, r in results.items()}
    baseline = next(iter(summaries))
    base = summaries[baseline]
    ratios = {
        name: {
            label: ratio(lookup(s, path), lookup(base, path)) for label, path, _ in HEADLINE_METRICS
        }
        for name, s in summaries.items()
    }
    return {
        "baseline": baseline,
        "slo": {"ttft_s": slo_ttft_s, "tbt_s": slo_tbt_s},
        "summaries": summaries,
        "ratios": ratios,
    }


def spread(comparisons: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per policy and headline metric, its values over repeated comparisons and their mean, min,
    max and standard deviation, and its ratio to the baseline in each repeat ('ratios') with their
    min and max (None where a repeat has no value)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in comparisons[0]["summaries"]:
        out[name] = {}
        for label, path, _ in HEADLINE_METRICS:
            values = [lookup(c["summaries"][name], path) for c in comparisons]
            have = [float(v) for v in values if v is not None]
            mean = sum(have) / len(have) if have else None
            std = (sum((v - mean) ** 2 for v in have) / len(have)) ** 0.5 if have else None
            ratios = [c["ratios"][name].get(label) for c in comparisons]
            known = [r for r in ratios if r is not None]
            out[name][label] = {
                "values": values, "mean": mean, "min": min(have, default=None),
                "max": max(have, default=None), "std": std, "ratios": ratios,
                "ratio_min": min(known, default=None), "ratio_max": max(known, default=None),
            }
    return out


def pressure_warnings(comparison: Mapping[str, Any]) -> list[str]:
    """What makes a comparison meaningless: every request failed, or (several policies, in
    process) none of them ever came under memory pressure, so their differences are noise."""
    summaries = comparison["summaries"]
    warnings = []
    if summaries and all(s.get("completed", 0) == 0 for s in summaries.values()):
        warnings.append(
            "every request failed (see 'rejected' in the JSON report): there is nothing to "
            "compare"
        )
    engines = [s.get("engine") for s in summaries.values()]
    if len(summaries) > 1 and engines and all(e is not None for e in engines) and all(
        not e.get("preemptions") and not e.get("remapped_layers") and not e.get("swap_out_bytes")
        for e in engines
    ):
        warnings.append(
            "no policy came under memory pressure (0 preemptions, 0 remaps, 0 swaps): the "
            "policies behaved the same and the ratios are run-to-run noise; lower "
            "--memory-budget or raise the load"
        )
    return warnings
