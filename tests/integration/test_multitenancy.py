"""Several models on one page arena, with a memory budget too small for everybody's KV cache.

Every policy (recompute, swap, static shares) under both kinds of sharing (temporal: one model per
step; spatial: every model each step) must finish every request with the same greedy tokens as the
request run alone with ample memory, leave no page, KV block or host swap block behind, and keep the
engine's invariants after every step. The step trace and the per-model counters must agree with what
happened. Three random tiny models cover the policy x sharing grid quickly; SmolLM2 under two names
next to a random model covers real weights under recompute and swap.
"""

from __future__ import annotations

import gc
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

from oneiros import LLM, SamplingParams
from oneiros.config import EngineConfig, MiB
from oneiros.core import RequestOutput
from oneiros.engine.engine import LLMEngine
from oneiros.memory.weights import weight_pages
from oneiros.models.loader import resolve
from oneiros.models.registry import build_model

TINY = {"a": "random:llama-tiny", "b": "random:opt-tiny@1", "c": "random:qwen2-tiny@2"}
TINY_PAGE = 64 * 1024
TINY_KV_PAGES = 8  # llama/qwen: 4 blocks of 16 tokens a page, opt: 2; demand is ~3x this


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---- workloads -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    model: str  # tenant name
    prompt: tuple[int, ...]
    max_tokens: int
    arrive_at: int  # engine step (number of step() calls so far) at which it is added


def params(job: Job) -> SamplingParams:
    return SamplingParams(max_tokens=job.max_tokens, temperature=0.0, ignore_eos=True)


def tiny_jobs() -> list[Job]:
    """5 requests per model, prompts of 8-40 random tokens, 16-32 output tokens; three arrive at
    once, two while the others decode. Any one request (72 tokens at most: 5 blocks of 16) fits the
    smallest static share (opt-tiny: 3 pages of 2 blocks; qwen2-tiny: 2 pages of 4 blocks), while
    each model's five together need about twice its share."""
    rng = random.Random(1234)
    jobs = []
    for m in TINY:
        for k in range(5):
            n, out = rng.randint(8, 40), rng.randint(16, 32)
            prompt = tuple(rng.randrange(3, 512) for _ in range(n))
            jobs.append(Job(m, prompt, out, 0 if k < 3 else rng.randint(1, 12)))
    return jobs


def weight_pages_of(sources, page_bytes: int) -> int:
    return sum(
        weight_pages(build_model(resolve(s).config, torch.float32, torch.device("cpu")), page_bytes)
        for s in sources
    )


def make_engine(models: dict[str, str], **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(models=dict(models), **kw))


def tiny_engine(**kw) -> LLMEngine:
    weights = weight_pages_of(TINY.values(), TINY_PAGE)
    kw.setdefault("swap_space", 3 * MiB)
    engine = make_engine(
        TINY, page_bytes=TINY_PAGE, memory_budget=(weights + TINY_KV_PAGES) * TINY_PAGE, **kw
    )
    assert engine.arena.num_pages == weights + TINY_KV_PAGES
    return engine


# ---- solo references -----------------------------------------------------------------------------
class SoloRuns:
    """Greedy tokens of each request run alone in its own engine with ample memory (cached)."""

    def __init__(self, make_llm: Callable[[str], LLM], llms: dict[str, LLM] | None = None) -> None:
        self._make = make_llm
        self._llms: dict[str, LLM] = dict(llms or {})
        self._cache: dict[tuple, list[int]] = {}

    def tokens(self, source: str, job: Job) -> list[int]:
        key = (source, job.prompt, job.max_tokens)
        if key not in self._cache:
            if source not in self._llms:
                self._llms[source] = self._make(source)
            (out,) = self._llms[source].generate(list(job.prompt), params(job))
            assert out.finished and out.num_preemptions == 0
            self._cache[key] = out.token_ids
        return self._cache[key]


def tiny_solo_llm(source: str) -> LLM:
    return LLM(models={"solo": source}, page_bytes=TINY_PAGE, memory_budget=4 * MiB)


@pytest.fixture(scope="module")
def tiny_solo() -> Iterator[SoloRuns]:
    yield SoloRuns(tiny_solo_llm)


# ---- driving an engine ---------------------------------------------------------------------------
@dataclass
class Run:
    outputs: dict[str, RequestOutput]  # request id -> final output
    jobs: dict[str, Job]  # request id -> job
    steps: int  # step() calls
    busy_steps: int  # step() calls that ran at least one plan


def drive(
    engine: LLMEngine,
    jobs: list[Job],
    each_step: Callable[[LLMEngine], None] | None = None,
    max_steps: int = 5000,
) -> Run:
    """Add jobs when their step comes, step until everything finished, checking every step."""
    pending = sorted(jobs, key=lambda j: j.arrive_at)
    ids: dict[str, Job] = {}
    outputs: dict[str, RequestOutput] = {}
    steps = busy = 0
    while pending or engine.has_unfinished():
        assert steps < max_steps, "the engine did not drain its requests"
        while pending and pending[0].arrive_at <= steps:
            j = pending.pop(0)
            ids[engine.add_request(list(j.prompt), params(j), j.model).request_id] = j
        history = len(engine.store.page_history)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in outputs, "a request finished twice"
                outputs[out.request_id] = out
        steps += 1
        busy += len(engine.store.page_history) > history  # a step that ran plans records pages
        engine.check_integrity()
        if each_step is not None:
            each_step(engine)
    return Run(outputs, ids, steps, busy)


def assert_no_leaks(engine: LLMEngine) -> None:
    engine.check_integrity()
    assert not engine.has_unfinished()
    for t in engine.tenants.values():
        assert t.pool.num_used == 0, f"{t.name}: KV blocks leaked"
        assert not t.scheduler.running and not t.scheduler.waiting
        hp = t.scheduler.host_pool
        if hp is not None:
            assert hp.num_free == hp.num_blocks, f"{t.name}: host swap blocks leaked"
    # Every page is a weight page, a KV page or free: nothing else holds memory.
    usage = engine.arena.usage_by_kind()
    assert sum(usage.values()) == engine.arena.num_pages
    assert all(k == "free" or k.rsplit("/", 1)[1] in ("resident", "slab", "kv") for k in usage)


def assert_matches_solo(run: Run, solo: SoloRuns, sources: dict[str, str]) -> None:
    assert set(run.outputs) == set(run.jobs), "not every request finished"
    for rid, out in run.outputs.items():
        job = run.jobs[rid]
        assert out.finish_reason == "length" and len(out.token_ids) == job.max_tokens
        want = solo.tokens(sources[job.model], job)
        assert out.token_ids == want, (
            f"{rid} on {job.model} ({out.num_preemptions} preemptions) differs from its solo run"
        )


def read_trace(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_trace(trace: list[dict], engine: LLMEngine, run: Run) -> None:
    """One line per step that ran something (or only preempted); per-model sums equal the engine's
    counters."""
    assert sum(any(p["executed"] for p in rec["plans"]) for rec in trace) == run.busy_steps
    sums: dict[str, dict[str, int]] = {n: {} for n in engine.tenants}
    for rec in trace:
        assert rec["dt"] >= 0 and rec["plans"]
        assert sum(rec["pages"].values()) == engine.arena.num_pages
        models = [p["model"] for p in rec["plans"]]
        assert len(models) == len(set(models)), "a model twice in one step"
        for p in rec["plans"]:
            assert p["model"] in engine.tenants
            assert p["batch"] >= 0 and p["prefill_tokens"] >= 0 and p["decode_tokens"] >= 0
            assert p["decode_tokens"] <= p["batch"]  # a decode is one token of one sequence
            # An empty plan is traced only when it preempted (and then it did not execute).
            assert p["batch"] > 0 or p["swap_out_blocks"] > 0 or (
                not p["executed"] and p["preempted"] > 0
            )
            s = sums[p["model"]]
            for k in ("prefill_tokens", "decode_tokens", "preempted", "swap_out_blocks",
                      "swap_in_blocks"):
                s[k] = s.get(k, 0) + p[k]
            s["steps"] = s.get("steps", 0) + p["executed"]
            s["sampled"] = s.get("sampled", 0) + p["sampled"]
    for name, t in engine.tenants.items():
        c, s = t.state.counters, sums[name]
        assert s.get("steps", 0) == c.steps
        # Every sampled row became one output token (a preempted request keeps its tokens).
        assert s.get("sampled", 0) == sum(
            len(out.token_ids) for rid, out in run.outputs.items() if run.jobs[rid].model == name
        )
        assert s.get("prefill_tokens", 0) == c.prefill_tokens
        assert s.get("decode_tokens", 0) == c.decode_tokens
        assert s.get("swap_out_blocks", 0) * t.pool.block_bytes == c.swap_out_bytes
        assert s.get("swap_in_blocks", 0) * t.pool.block_bytes == c.swap_in_bytes
        # Preemptions inside plans that ran nothing (recompute, dropped) are not in the trace.
        assert s.get("preempted", 0) <= c.preemptions


def token_accounting(engine: LLMEngine, run: Run) -> None:
    """Every prompt token and every output token but the last is computed once, plus what
    recompute preemption threw away (swap throws nothing away), less what the prefix cache held
    (a recomputed request finds its own blocks there while they last)."""
    for name, t in engine.tenants.items():
        jobs = [j for j in run.jobs.values() if j.model == name]
        c = t.state.counters
        work = sum(len(j.prompt) + j.max_tokens - 1 for j in jobs)
        computed = c.prefill_tokens + c.decode_tokens
        assert computed == work + c.recomputed_tokens - c.prefix_cache_hits, name


# ---- three random tiny models: every policy x sharing --------------------------------------------
@pytest.mark.parametrize("sharing", ["temporal", "spatial"])
@pytest.mark.parametrize("policy", ["recompute", "swap", "static"])
def test_three_tiny_models_share_a_small_arena(policy, sharing, tiny_solo, tmp_path):
    trace_path = tmp_path / "steps.jsonl"
    engine = tiny_engine(policy=policy, sharing=sharing, trace_steps=str(trace_path))
    static_pages = {n: t.pool.num_pages for n, t in engine.tenants.items()}
    if policy == "static":
        # Every KV page is split up front; nobody's pool ever changes size.
        assert sum(static_pages.values()) == TINY_KV_PAGES and engine.arena.num_free == 0
        assert sorted(static_pages.values()) == [2, 3, 3]

    def each_step(e: LLMEngine) -> None:
        if policy == "static":
            assert {n: t.pool.num_pages for n, t in e.tenants.items()} == static_pages
            assert e.arena.num_free == 0

    jobs = tiny_jobs()
    run = drive(engine, jobs, each_step)
    engine.close()

    assert_matches_solo(run, tiny_solo, TINY)
    assert_no_leaks(engine)
    counters = {n: t.state.counters for n, t in engine.tenants.items()}
    preemptions = sum(c.preemptions for c in counters.values())
    if policy in ("recompute", "static"):
        assert preemptions > 0
        assert sum(c.recomputed_tokens for c in counters.values()) > 0
        assert all(c.swap_out_bytes == c.swap_in_bytes == 0 for c in counters.values())
    if policy == "swap":
        assert preemptions > 0
        assert sum(c.swap_out_bytes for c in counters.values()) > 0
        for c in counters.values():
            # A resumed request finds its own blocks in the prefix cache while they last (they
            # were copied out, and still hold its tokens): only the others are copied back.
            assert c.swap_in_bytes <= c.swap_out_bytes
        # The host pool is big enough here, so nothing is ever recomputed.
        assert sum(c.recomputed_tokens for c in counters.values()) == 0
    token_accounting(engine, run)

    trace = read_trace(trace_path)
    check_trace(trace, engine, run)
    # Forward passes per step (a plan that only copies KV out for another model's request runs
    # no forward pass).
    per_step = [sum(p["executed"] and p["batch"] > 0 for p in rec["plans"]) for rec in trace]
    per_step = [n for n in per_step if n]
    if sharing == "temporal":
        assert set(per_step) == {1}
    else:
        assert max(per_step) > 1, "spatial sharing never ran two models in one step"
    # Every model ran, and more than one model held KV pages at some point (shared arena).
    assert {p["model"] for rec in trace for p in rec["plans"]} == set(TINY)
    kv_owners = [{k for k, v in rec["pages"].items() if k.endswith("/kv") and v} for rec in trace]
    assert max(len(o) for o in kv_owners) > 1
    if policy == "static":
        for rec in trace:
            assert {k: v for k, v in rec["pages"].items() if k.endswith("/kv")} == {
                f"{n}/kv": p for n, p in static_pages.items()
            }

    # The metadata store's page history: one entry at construction and one per step that ran.
    # Only another model's make_room shrinks a KV pool, so a pool that shrank lent its pages on:
    # that must happen when the arena is shared dynamically, and never under static shares.
    history = list(engine.store.page_history)
    assert len(history) == run.busy_steps + 1
    assert [u for _, u in history[1:]] == [rec["pages"] for rec in trace]
    lent = any(
        after.get(k, 0) < n
        for (_, before), (_, after) in zip(history, history[1:], strict=False)
        for k, n in before.items()
        if k.endswith("/kv")
    )
    assert lent == (policy != "static")


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_swap_falls_back_to_recompute_when_swap_space_runs_out(tiny_solo, caching):
    """A host pool of a few blocks: some preemptions swap, the rest recompute; same tokens. Without
    prefix caching every block swapped out is swapped in; with it, a resumed request's own blocks
    still in the cache are not."""
    # 96 KiB of swap: 2 host blocks of llama/qwen-tiny each, 1 of opt-tiny.
    engine = tiny_engine(policy="swap", swap_space=96 * 1024, prefix_caching=caching)
    assert [t.scheduler.host_pool.num_blocks for t in engine.tenants.values()] == [2, 1, 2]
    run = drive(engine, tiny_jobs())
    assert_matches_solo(run, tiny_solo, TINY)
    assert_no_leaks(engine)
    c = [t.state.counters for t in engine.tenants.values()]
    assert sum(x.recomputed_tokens for x in c) > 0
    if caching:
        assert all(x.swap_in_bytes <= x.swap_out_bytes for x in c)
    else:
        assert all(x.swap_in_bytes == x.swap_out_bytes for x in c)
        assert all(x.prefix_cache_queries == x.prefix_cache_hits == 0 for x in c)
    token_accounting(engine, run)


def test_aborting_swapped_out_and_running_requests_leaves_nothing_behind():
    engine = tiny_engine(policy="swap")
    reqs = [engine.add_request(list(j.prompt), params(j), j.model) for j in tiny_jobs()]
    swapped = None
    for _ in range(2000):
        engine.step()
        engine.check_integrity()
        swapped = next((r for r in reqs if r.host_block_ids), None)
        if swapped is not None:
            break
    assert swapped is not None, "nothing was swapped out"
    host = engine.tenants[swapped.model].scheduler.host_pool
    free, held = host.num_free, len(swapped.host_block_ids)
    assert engine.abort(swapped.request_id)
    assert host.num_free == free + held
    assert swapped.host_block_ids == [] and swapped.finished
    running = next(r for t in engine.tenants.values() for r in t.scheduler.running)
    assert engine.abort(running.request_id)
    assert running.block_ids == [] and running.finished
    assert not engine.abort(running.request_id)
    engine.check_integrity()
    while engine.has_unfinished():
        engine.step()
        engine.check_integrity()
    assert_no_leaks(engine)
    assert all(r.finished for r in reqs)


# ---- SmolLM2 twice plus a random model -----------------------------------------------------------
SMOL_QUESTIONS = {
    "a": ["What is the capital of France?", "Write a haiku about the sea.",
          "Count from one to ten.", "Name three colors."],
    "b": ["What is 2+2?", "Describe a cat in one sentence.", "Why is the sky blue?",
          "Tell me a joke."],
}
SMOL_KV_PAGES = 6  # 2 MiB pages: 12 SmolLM2 blocks of 16 tokens (one page goes to the tiny model)


@pytest.fixture(scope="module")
def smol_jobs(smollm2_llm) -> list[Job]:
    """Chat prompts (~36 tokens with SmolLM2's system prompt) and 24 output tokens: 4 KV blocks
    each, 16 per tenant, 32 for the two, against 12 in the budget. Plus three tiny-model
    requests."""
    eng = smollm2_llm.engine
    jobs = [
        Job(m, tuple(eng.encode(None, messages=[{"role": "user", "content": q}])), 24, k)
        for m, qs in SMOL_QUESTIONS.items()
        for k, q in enumerate(qs)
    ]
    rng = random.Random(7)
    jobs += [Job("c", tuple(rng.randrange(3, 512) for _ in range(20)), 20, 2 * k) for k in range(3)]
    return jobs


@pytest.fixture(scope="module")
def smol_solo(smollm2_llm) -> SoloRuns:
    """SmolLM2 alone: the shared session engine (ample memory); the tiny model on its own."""
    return SoloRuns(tiny_solo_llm, {"smollm2": smollm2_llm})


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["recompute", "swap"])
def test_smollm2_twice_and_a_random_model(policy, smollm2_llm, smol_jobs, smol_solo, tmp_path):
    sources = {"a": "smollm2", "b": "smollm2", "c": "random:llama-tiny"}
    page = 2 * MiB
    weights = 2 * smollm2_llm.engine.tenant(None).residency.total_pages
    weights += weight_pages_of(["random:llama-tiny"], page)
    llm = LLM(
        models=sources,
        policy=policy,
        sharing="temporal",
        memory_budget=(weights + SMOL_KV_PAGES) * page,
        swap_space=64 * MiB,
        trace_steps=str(tmp_path / "steps.jsonl"),
    )
    engine = llm.engine
    assert engine.arena.num_free == SMOL_KV_PAGES
    try:
        run = drive(engine, smol_jobs)
        engine.close()

        assert_matches_solo(run, smol_solo, sources)
        assert_no_leaks(engine)
        c = {n: t.state.counters for n, t in engine.tenants.items()}
        assert c["a"].preemptions + c["b"].preemptions > 0
        if policy == "swap":
            assert c["a"].swap_out_bytes + c["b"].swap_out_bytes > 0
            # The chat template's system prompt is a block every request of a model shares: a
            # swap-out leaves it to the prefix cache (copied by no one), and a request whose
            # shared block was reused meanwhile recomputes from it; nothing else is recomputed.
            assert all(x.swap_in_bytes <= x.swap_out_bytes for x in c.values())
            assert all(x.recomputed_tokens <= x.prefix_cache_queries for x in c.values())
        else:
            assert c["a"].recomputed_tokens + c["b"].recomputed_tokens > 0
            assert all(x.swap_out_bytes == 0 for x in c.values())
        token_accounting(engine, run)
        trace = read_trace(tmp_path / "steps.jsonl")
        check_trace(trace, engine, run)
        assert all(
            sum(p["executed"] and p["batch"] > 0 for p in rec["plans"]) <= 1 for rec in trace
        )
    finally:
        del llm, engine
        gc.collect()


# ---- trace completeness --------------------------------------------------------------------------------
def test_trace_records_every_preemption(tmp_path):
    """a and c each hold one of the two KV pages with a 60-token prompt (4 blocks of 16: one page).
    At position 64 a needs a 5th block and c's page is busy: a model preempts its own requests, and
    a's request, never preempted before, is not the liveness exception, so it preempts itself
    (traced as a's plan that only preempted). Every preemption is in the trace."""
    trace_path = tmp_path / "steps.jsonl"
    models = {"a": TINY["a"], "c": TINY["c"]}
    weights = weight_pages_of(models.values(), TINY_PAGE)
    engine = make_engine(  # turns of one step: both prompts are in before a needs its block
        models, page_bytes=TINY_PAGE, memory_budget=(weights + 2) * TINY_PAGE,
        max_wait_s=1e9, trace_steps=str(trace_path), turn_steps=1,
    )
    rng = random.Random(3)
    jobs = [Job(m, tuple(rng.randrange(3, 512) for _ in range(60)), 6, 0) for m in models]
    run = drive(engine, jobs)
    engine.close()
    assert len(run.outputs) == 2
    assert engine.tenants["a"].state.counters.preemptions >= 1
    traced = sum(p["preempted"] for rec in read_trace(trace_path) for p in rec["plans"])
    assert traced == sum(t.state.counters.preemptions for t in engine.tenants.values())
