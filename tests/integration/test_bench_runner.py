"""The benchmark runner end to end on real engines with two tiny random models.

  - one Poisson workload under recompute and oneiros (`run_policies`): every request finishes with
    exactly its forced output length and its scheduled arrival, counters and page history are
    consistent, and the JSON report, the PNG and the ratios are produced;
  - requests the engine refuses are counted by kind, and a workload for tenants the engine does
    not serve is refused up front;
  - on a virtual clock the runner jumps to the next arrival instead of sleeping;
  - over HTTP, against the real server on a loopback port (streaming, token-id prompts, logprobs
    and usage), and against a scripted transport for the SSE edge cases.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
import torch

from oneiros.bench.metrics import HEADLINE_METRICS, RequestRecord
from oneiros.bench.report import print_table, write_report
from oneiros.bench.runner import (
    RunResult,
    compare,
    run_engine,
    run_http,
    run_policies,
    spread,
)
from oneiros.bench.workloads import WorkItem, as_sessions, workload_from_spec
from oneiros.config import EngineConfig
from oneiros.core import SamplingParams
from oneiros.engine.clock import VirtualClock
from oneiros.engine.engine import LLMEngine
from oneiros.memory.weights import weight_pages
from oneiros.models.loader import resolve
from oneiros.models.registry import build_model
from tests.helpers import ServerThread

SOURCES = {"a": "random:llama-tiny", "b": "random:opt-tiny@1"}
PAGE = 64 * 1024
KV_PAGES = 4  # llama-tiny: 64 tokens a page with blocks of 4; opt-tiny: 32. A burst needs more.
SPEC = "poisson:rate=100,n=10,mix=a+b,lengths=alpaca,max_len=40,seed=1"


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def weight_pages_total() -> int:
    dev = torch.device("cpu")
    return sum(
        weight_pages(build_model(resolve(s).config, torch.float32, dev), PAGE)
        for s in SOURCES.values()
    )


def make_engine(weights: int, policy: str = "recompute", kv_pages: int = KV_PAGES) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            models=dict(SOURCES),
            page_bytes=PAGE,
            block_size=4,
            memory_budget=(weights + kv_pages) * PAGE,
            policy=policy,
        )
    )


def check_records(result: RunResult, workload: list[WorkItem]) -> None:
    """Every request finished, in workload order, with its forced length and scheduled arrival."""
    assert result.rejected == {}
    assert len(result.records) == len(workload)
    for item, r in zip(workload, result.records, strict=True):
        assert r.model == item.model and r.prompt_len == item.prompt_len
        assert r.finish_reason == "length"
        assert r.output_len == item.output_len == len(r.token_times)
        assert r.arrival == pytest.approx(item.arrival_s, abs=1e-9)
        assert r.token_times == sorted(r.token_times) and r.token_times[0] >= r.arrival


# ---- in process ----------------------------------------------------------------------------------
def test_two_policies_on_a_poisson_workload(weight_pages_total, tmp_path):
    workload = workload_from_spec(SPEC)
    assert len(workload) == 10 and {w.model for w in workload} == {"a", "b"}
    results = run_policies(
        lambda policy: make_engine(weight_pages_total, policy),
        ["recompute", "oneiros"],
        workload,
        progress=False,
        max_steps=20_000,
    )
    assert list(results) == ["recompute", "oneiros"]
    for policy, result in results.items():
        assert result.policy == policy
        check_records(result, workload)
        assert set(result.counters) == {"a", "b"}
        totals = result.engine_totals()
        # A request's preemption count and the models' preemption counters count the same events.
        assert sum(r.preemptions for r in result.records) == totals["preemptions"]
        # Every prompt token and every output token but the last is computed once, plus what
        # recompute preemption threw away, less what the prefix cache held.
        work = sum(w.prompt_len + w.output_len - 1 for w in workload)
        computed = totals["prefill_tokens"] + totals["decode_tokens"]
        assert computed == work + totals["recomputed_tokens"] - totals["prefix_cache_hits"]
        history = result.page_history
        assert history[0][0] == 0.0 and len(history) > 1
        assert all(sum(u.values()) == result.num_pages for _, u in history)
        assert [t for t, _ in history] == sorted(t for t, _ in history)
        assert result.wall_s > 0 and result.clock_s > 0

    out_json, out_png = tmp_path / "bench.json", tmp_path / "plots" / "bench.png"
    report = write_report(
        results, out_json, out_png, config={"workload": SPEC, "models": SOURCES}, slo_ttft_s=5.0
    )
    data = json.loads(out_json.read_text())
    assert data["config"]["workload"] == SPEC
    assert set(data["runs"]) == {"recompute", "oneiros"}
    assert len(data["runs"]["oneiros"]["records"]) == 10
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000

    ratios = report["comparison"]["ratios"]
    assert set(ratios["oneiros"]) == {label for label, _, _ in HEADLINE_METRICS}
    for label in ("ttft_p50", "ttft_p99", "tbt_p50", "tbt_p99", "throughput_tok_s"):
        assert ratios["recompute"][label] == 1.0
        assert ratios["oneiros"][label] > 0
    summary = report["comparison"]["summaries"]["oneiros"]
    assert summary["generated_tokens"] == sum(w.output_len for w in workload)
    assert summary["goodput"]["requests"] <= 10
    assert report["comparison"] == compare(results, slo_ttft_s=5.0)

    table = tmp_path / "table.txt"
    with table.open("w") as f:
        print_table(report["comparison"], file=f, use_rich=False)
    assert "oneiros" in table.read_text()


def test_refused_requests_are_counted_not_raised(weight_pages_total):
    engine = make_engine(weight_pages_total)
    workload = [
        WorkItem(0.0, "a", 8, 4),
        WorkItem(0.0, "b", 600, 4),  # opt-tiny's context is 512 tokens
        WorkItem(0.001, "b", 8, 5),
    ]
    result = run_engine(engine, workload, progress=False, overlong="reject")
    assert result.rejected == {"context": 1} and result.clipped == 0
    assert "512-token context" in result.rejected_examples["context"]
    assert [(r.model, r.output_len) for r in result.records] == [("a", 4), ("b", 5)]
    # By default an overlong request is shortened to fit (prompt first) and counted; this engine
    # has KV memory for 512 tokens of opt-tiny (16 pages of 32 tokens).
    clipped = run_engine(make_engine(weight_pages_total, kv_pages=20), workload, progress=False)
    assert clipped.rejected == {} and clipped.clipped == 1
    assert [(r.prompt_len, r.output_len) for r in clipped.records] == [(8, 4), (508, 4), (8, 5)]
    assert clipped.summary()["clipped"] == 1
    # What the engine itself refuses is counted by kind, with its message: a prompt that fits the
    # context but not the KV memory (4 pages of 32 opt-tiny tokens).
    big = run_engine(engine, [WorkItem(0.0, "b", 200, 4)], progress=False)
    assert big.rejected == {"InvalidRequestError(prompt)": 1}
    assert "KV blocks" in big.rejected_examples["InvalidRequestError(prompt)"]
    with pytest.raises(ValueError, match="does not serve"):
        run_engine(engine, [WorkItem(0.0, "c", 8, 4)], progress=False)
    # The engine can be reused: counters and page history are per run.
    again = run_engine(engine, workload[:1], progress=False)
    assert again.engine_totals()["decode_tokens"] == 3
    assert again.page_history[0][0] == 0.0


def test_per_request_params_and_kept_tokens(weight_pages_total):
    """`make_params` sets each request's sampling parameters and `keep_tokens` keeps what each
    finished request generated, by workload index, with the top alternatives it asked for."""
    engine = make_engine(weight_pages_total, kv_pages=16)
    workload = [WorkItem(0.0, "a", 8, 4), WorkItem(0.0, "b", 600, 5), WorkItem(0.0, "b", 9, 3)]
    asked = []

    def params(k: int, item: WorkItem) -> SamplingParams:
        asked.append((k, item.prompt_len))
        return SamplingParams(max_tokens=item.output_len, temperature=0.0, ignore_eos=True,
                              logprobs=2 if k != 2 else None)

    result = run_engine(engine, workload, progress=False, overlong="reject", make_params=params,
                        keep_tokens=True)
    assert sorted(asked) == [(0, 8), (2, 9)]  # the overlong request was refused before
    assert set(result.outputs) == {0, 2}
    for k, out in result.outputs.items():
        assert len(out.token_ids) == len(out.logprobs) == workload[k].output_len
    for tid, lp, top in zip(*(getattr(result.outputs[0], f)
                              for f in ("token_ids", "logprobs", "top_logprobs")), strict=True):
        assert len(top) == 2 and max(top, key=top.get) == tid and top[tid] == pytest.approx(lp)
    assert not any(result.outputs[2].top_logprobs)  # no alternatives asked for
    # Without keep_tokens nothing is kept.
    assert run_engine(engine, workload[:1], progress=False).outputs == {}


def test_idle_waits_go_through_the_engine_clock(weight_pages_total):
    """A virtual clock (as the simulator's) jumps over idle time: arrivals 50 s apart take no wall
    time, and the records keep the scheduled arrivals."""
    engine = make_engine(weight_pages_total)
    engine.clock = VirtualClock(start=engine.clock.now())
    workload = [WorkItem(0.0, "a", 8, 3), WorkItem(50.0, "b", 8, 3), WorkItem(100.0, "a", 8, 3)]
    result = run_engine(engine, workload, progress=False)
    check_records(result, workload)
    assert result.clock_s == pytest.approx(100.0)
    assert result.wall_s < 20


def test_spread_over_repeats_keeps_each_repeats_ratio():
    """Per policy and metric: the values over repeats and, against the baseline of each repeat,
    the ratios and their range (the baseline's own ratios are 1)."""

    def run(tpot: float) -> RunResult:  # one request of three tokens, tpot apart
        return RunResult([RequestRecord("a", 0.0, [1.0, 1.0 + tpot, 1.0 + 2 * tpot], 4, 3)])

    repeats = [compare({"base": run(0.2), "new": run(0.1)}),
               compare({"base": run(0.4), "new": run(0.1)})]
    s = spread(repeats)["new"]["tpot_p99"]
    assert s["values"] == pytest.approx([0.1, 0.1]) and s["mean"] == pytest.approx(0.1)
    assert s["ratios"] == pytest.approx([0.5, 0.25])
    assert (s["ratio_min"], s["ratio_max"]) == pytest.approx((0.25, 0.5))
    assert spread(repeats)["base"]["tpot_p99"]["ratios"] == [1.0, 1.0]
    assert spread(repeats)["new"]["preemptions"]["ratio_min"] is None  # no engine counters


# ---- over HTTP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(weight_pages_total) -> Iterator[str]:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from oneiros.server.app import build_app
    from oneiros.server.async_engine import AsyncLLMEngine

    aengine = AsyncLLMEngine(make_engine(weight_pages_total, kv_pages=16))
    aengine.start()
    try:
        with ServerThread(build_app(aengine, api_key=None, max_queue=64)) as server:
            yield f"http://127.0.0.1:{server.port}"
    finally:
        asyncio.run(aengine.shutdown(0))


def test_http_replay_against_the_server(server_url):
    workload = workload_from_spec("poisson:rate=50,n=6,mix=a+b,lengths=fixed,prompt_len=12,"
                                  "output_len=7,seed=2")
    workload.append(WorkItem(workload[-1].arrival_s, "a", 700, 3))  # too long: a 400
    result = run_http(server_url + "/v1", workload, concurrency_limit=3, progress=False)
    assert result.target == server_url + "/v1"
    assert sum(result.rejected.values()) == 1
    (kind,) = result.rejected
    assert kind.startswith("HTTP 400")
    check_records(RunResult(result.records), workload[:-1])
    summary = result.summary()
    assert summary["engine"] is None and summary["tbt_s"]["count"] == 6 * 6


def sse(*events: object) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def scripted_transport() -> httpx.MockTransport:
    """A fake server: model 'quiet' streams text without logprobs and under-reports tokens in its
    chunks (usage says 5), 'busy' answers 429, 'broken' sends an error event mid-stream."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0.0
        assert body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] == 5 and all(100 <= t < 512 for t in body["prompt"])
        assert request.headers["authorization"] == "Bearer k"
        if body["model"] == "busy":
            return httpx.Response(429, json={"error": {"message": "full", "type": "rate_limit"}})
        if body["model"] == "broken":
            content = sse({"choices": [{"text": "x"}]}, {"error": {"message": "boom",
                                                                   "type": "internal_error"}})
            return httpx.Response(200, content=content)
        content = sse(
            {"choices": [{"index": 0, "text": "a", "finish_reason": None}], "usage": None},
            {"choices": [{"index": 0, "text": "", "finish_reason": None}], "usage": None},
            {"choices": [{"index": 0, "text": "bc", "finish_reason": "length"}], "usage": None},
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}},
        )
        return httpx.Response(200, content=content)

    return httpx.MockTransport(handler)


def test_http_stream_edge_cases():
    workload = [WorkItem(0.0, m, 9, 5) for m in ("quiet", "busy", "broken")]
    result = run_http(
        "http://fake", workload, api_key="k", progress=False, transport=scripted_transport()
    )
    assert result.rejected == {"HTTP 429 rate_limit": 1, "stream error internal_error": 1}
    (r,) = result.records
    # Two chunks with text counted one token each; usage says 5, the rest get the last chunk's time.
    assert r.output_len == 5 and len(r.token_times) == 5
    assert r.token_times[2:] == [r.token_times[-1]] * 3
    assert r.finish_reason == "length"


def test_conversation_turns_carry_their_history_and_hit_the_prefix_cache(weight_pages_total):
    """Three conversations of three turns: each later turn is sent after the turn before it
    finished, with that turn's prompt and output before its own tokens. A conversation alone
    finds every full block of its history that was computed (all but the last output token) in
    the prefix cache; one refused turn refuses the rest of its conversation."""
    items = [WorkItem(0.001 * k, "a", 9 + k, 5 + k % 3) for k in range(9)]
    workload = as_sessions(items, turns=3)
    assert [w.follows for w in workload] == [None, 0, 1, None, 3, 4, None, 6, 7]
    for sessions in (workload, workload[:3]):
        e = make_engine(weight_pages_total, kv_pages=16)
        result = run_engine(e, sessions, progress=False, policy="recompute")
        assert result.rejected == {} and len(result.records) == len(sessions)
        recs = result.records
        cached = 0
        for k, w in enumerate(sessions):
            r = recs[k]
            assert r.output_len == w.output_len
            if w.follows is None:
                assert r.prompt_len == w.prompt_len
                continue
            before = recs[w.follows]
            history = before.prompt_len + before.output_len
            assert r.prompt_len == history + w.prompt_len
            assert r.arrival >= before.token_times[-1]  # sent after the turn it follows
            cached += (history - 1) // 4 * 4  # full blocks of 4 computed tokens
        hits = result.counters["a"]["prefix_cache_hits"]
        if len(sessions) == 3:
            assert hits == cached
        else:  # other conversations' blocks may reuse a finished turn's meanwhile
            assert 0 < hits <= cached
        e.check_integrity()

    long = [WorkItem(0.0, "a", 10, 4), WorkItem(0.0, "a", 2000, 4, follows=0),
            WorkItem(0.0, "a", 3, 4, follows=1)]
    result = run_engine(make_engine(weight_pages_total, kv_pages=16), long, progress=False,
                        overlong="reject")
    assert len(result.records) == 1 and result.rejected == {"context": 1, "session": 1}
