"""Benchmark metrics (`oneiros/bench/metrics.py`) on hand-computed examples, the comparison of runs
(`runner.compare`, `RunResult`) and the report's pure helpers (page grouping, CDFs, the table).

The worked example, three requests on one clock (seconds):

    A  model a  arrival 0.0  tokens at 1.0 1.5 2.5 3.0  prompt 10   TTFT 1.0  gaps 0.5 1.0 0.5
    B  model b  arrival 1.0  tokens at 1.2 1.4          prompt 5    TTFT 0.2  gaps 0.2
    C  model a  arrival 2.0  tokens at 4.0              prompt 20   TTFT 2.0  no gaps

TTFTs sorted 0.2 1.0 2.0: mean 3.2/3, p50 1.0, p90 at rank 1.8 -> 1.8, p99 at rank 1.98 -> 1.98.
Gaps pooled, sorted 0.2 0.5 0.5 1.0: mean 0.55, p50 0.5, p90 at rank 2.7 -> 0.85, p99 -> 0.985.
Makespan 0.0 -> 4.0 = 4 s; 7 generated tokens -> 1.75 tok/s; 35 + 7 tokens -> 10.5 tok/s.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oneiros.bench.metrics import (
    RequestRecord,
    distribution,
    lookup,
    makespan,
    meets_slo,
    ratio,
    request_p99_tbt,
    summarize,
)
from oneiros.bench.report import (
    cdf,
    format_plain_table,
    load_results,
    page_kind,
    pages_by_kind,
    print_table,
    table_rows,
    write_report,
)
from oneiros.bench.runner import RequestTokens, RunResult, compare, rejection_kind
from oneiros.core import InvalidRequestError, UnknownModelError


def rec(model, arrival, times, prompt, preemptions=0) -> RequestRecord:
    return RequestRecord(model, arrival, list(times), prompt, len(times), preemptions)


A = rec("a", 0.0, [1.0, 1.5, 2.5, 3.0], 10)
B = rec("b", 1.0, [1.2, 1.4], 5, preemptions=2)
C = rec("a", 2.0, [4.0], 20)
ABC = [A, B, C]


# ---- per request ---------------------------------------------------------------------------------
def test_request_record_definitions():
    assert A.ttft == 1.0 and A.tbt == [0.5, 1.0, 0.5] and A.latency == 3.0 and A.finish_time == 3.0
    assert B.ttft == pytest.approx(0.2) and B.tbt == pytest.approx([0.2])
    assert C.ttft == 2.0 and C.tbt == []
    assert A.tpot == pytest.approx(2 / 3) and A.max_gap == 1.0 and B.tpot == pytest.approx(0.2)
    assert C.tpot is None and C.max_gap is None
    empty = RequestRecord("a", 1.0, [], 3, 0, finish_reason=None)
    assert empty.ttft is None and empty.latency is None and empty.tbt == []
    assert RequestRecord.from_dict(A.to_dict()) == A


def test_own_p99_tbt_and_slo():
    # A's gaps sorted 0.5 0.5 1.0: rank 1.98 -> 0.5 + 0.98 * 0.5.
    assert request_p99_tbt(A) == pytest.approx(0.99)
    assert request_p99_tbt(C) is None
    assert meets_slo(A, 1.0, None) and not meets_slo(A, 0.99, None)  # TTFT <= SLO is good
    assert meets_slo(A, None, 0.99) and not meets_slo(A, None, 0.98)
    assert meets_slo(C, None, 0.001)  # no gaps: nothing breaks a TBT SLO
    assert meets_slo(C) and not meets_slo(RequestRecord("a", 0.0))  # no token: never good


# ---- run summaries -------------------------------------------------------------------------------
def test_distributions():
    ttft = distribution([1.0, 0.2, 2.0])
    assert ttft["count"] == 3
    assert ttft["mean"] == pytest.approx(3.2 / 3)
    assert ttft["p50"] == pytest.approx(1.0)
    assert ttft["p90"] == pytest.approx(1.8)
    assert ttft["p99"] == pytest.approx(1.98)
    assert ttft["max"] == 2.0
    none = distribution([])
    assert none["count"] == 0 and none["p99"] is None and none["mean"] is None


def test_summary_of_the_worked_example():
    s = summarize(ABC)
    assert s["requests"] == 3 and s["completed"] == 3
    assert s["prompt_tokens"] == 35 and s["generated_tokens"] == 7
    assert s["duration_s"] == 4.0
    assert s["ttft_s"]["p50"] == pytest.approx(1.0)
    assert s["ttft_s"]["p90"] == pytest.approx(1.8)
    assert s["ttft_s"]["p99"] == pytest.approx(1.98)
    tbt = s["tbt_s"]
    assert tbt["count"] == 4
    assert tbt["mean"] == pytest.approx(0.55)
    assert tbt["p50"] == pytest.approx(0.5)
    assert tbt["p90"] == pytest.approx(0.85)
    assert tbt["p99"] == pytest.approx(0.985)
    assert s["latency_s"]["max"] == 3.0
    # TPOT: one value per request with two tokens or more: A (3.0 - 1.0) / 3, B 0.2 / 1.
    tpot = s["tpot_s"]
    assert tpot["count"] == 2 and tpot["max"] == pytest.approx(2 / 3)
    assert tpot["p50"] == pytest.approx((2 / 3 + 0.2) / 2)
    # Worst gap per request: A 1.0, B 0.2 (a stall counts once per request, not once per gap).
    assert s["max_gap_s"]["count"] == 2 and s["max_gap_s"]["p99"] == pytest.approx(0.2 + 0.99 * 0.8)
    assert s["throughput_tok_s"] == pytest.approx(1.75)
    assert s["total_throughput_tok_s"] == pytest.approx(10.5)
    assert s["request_throughput_rps"] == pytest.approx(0.75)
    assert s["goodput"] is None  # no SLO, no goodput
    assert s["preemptions"] == 2


def test_per_model_breakdown_uses_the_runs_duration():
    s = summarize(ABC)
    a, b = s["per_model"]["a"], s["per_model"]["b"]
    assert set(s["per_model"]) == {"a", "b"}
    assert a["requests"] == 2 and a["generated_tokens"] == 5
    assert a["ttft_s"]["p50"] == pytest.approx(1.5)  # (1.0 + 2.0) / 2
    assert a["tbt_s"]["count"] == 3
    assert a["duration_s"] == b["duration_s"] == 4.0
    assert a["throughput_tok_s"] + b["throughput_tok_s"] == pytest.approx(s["throughput_tok_s"])
    assert "per_model" not in a


def test_goodput_needs_both_slos():
    g = summarize(ABC, slo_ttft_s=1.0, slo_tbt_s=0.6)["goodput"]
    # A: TTFT 1.0 ok, own P99 TBT 0.99 > 0.6. B: ok. C: TTFT 2.0 > 1.0. Good: B only.
    assert g["requests"] == 1
    assert g["fraction"] == pytest.approx(1 / 3)
    assert g["requests_per_s"] == pytest.approx(0.25)
    assert g["tokens_per_s"] == pytest.approx(0.5)
    only_tbt = summarize(ABC, slo_tbt_s=1.0)["goodput"]
    assert only_tbt["requests"] == 3 and only_tbt["tokens_per_s"] == pytest.approx(1.75)
    assert summarize(ABC, slo_ttft_s=0.1)["goodput"]["requests"] == 0


def test_explicit_duration_and_degenerate_runs():
    s = summarize(ABC, duration_s=8.0)
    assert s["throughput_tok_s"] == pytest.approx(7 / 8)
    assert s["per_model"]["a"]["throughput_tok_s"] == pytest.approx(5 / 8)
    empty = summarize([])
    assert empty["duration_s"] is None and empty["throughput_tok_s"] is None
    assert empty["ttft_s"]["p50"] is None and empty["per_model"] == {}
    stuck = summarize([RequestRecord("a", 0.0, [], 4, 0, finish_reason=None), C])
    assert stuck["completed"] == 1 and stuck["ttft_s"]["count"] == 1
    assert makespan([RequestRecord("a", 0.0)]) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 100),
            st.lists(st.floats(0.001, 10), min_size=1, max_size=20),
            st.integers(1, 1000),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_summary_invariants(requests):
    records = []
    for arrival, deltas, prompt in requests:
        times = (arrival + np.cumsum(deltas)).tolist()
        records.append(RequestRecord("m", arrival, times, prompt, len(times)))
    s = summarize(records)
    for d in (s["ttft_s"], s["tbt_s"], s["latency_s"]):
        if d["count"]:
            assert d["p50"] <= d["p90"] + 1e-12 <= d["p99"] + 2e-12 <= d["max"] + 3e-12
    assert s["tbt_s"]["count"] == sum(len(r.token_times) - 1 for r in records)
    assert s["throughput_tok_s"] * s["duration_s"] == pytest.approx(s["generated_tokens"])
    assert s["per_model"]["m"]["generated_tokens"] == s["generated_tokens"]


# ---- comparing runs ------------------------------------------------------------------------------
def scaled(records, k):
    """The same requests with every TTFT and gap multiplied by k."""
    return [
        RequestRecord(
            r.model, r.arrival, [r.arrival + k * (t - r.arrival) for t in r.token_times],
            r.prompt_len, r.output_len, r.preemptions,
        )
        for r in records
    ]


def counters(preemptions, remapped):
    return {"a": {"preemptions": preemptions, "remapped_layers": remapped, "restored_layers": 0}}


def test_compare_gives_ratios_against_the_first_run():
    base = RunResult(ABC, counters=counters(4, 0), policy="recompute")
    fast = RunResult(scaled(ABC, 0.5), counters=counters(0, 3), policy="oneiros")
    c = compare({"recompute": base, "oneiros": fast}, slo_ttft_s=10.0)
    assert c["baseline"] == "recompute"
    r = c["ratios"]["oneiros"]
    assert r["ttft_p50"] == pytest.approx(0.5) and r["ttft_p99"] == pytest.approx(0.5)
    assert r["tbt_p50"] == pytest.approx(0.5) and r["tbt_p99"] == pytest.approx(0.5)
    assert r["throughput_tok_s"] > 1.0
    assert r["goodput_tok_s"] == pytest.approx(r["throughput_tok_s"])  # every request is good
    assert r["preemptions"] == 0.0
    assert r["remapped_layers"] is None  # 3 against 0: no ratio
    assert r["restored_layers"] == 1.0  # 0 against 0
    assert all(v in (1.0, None) for v in c["ratios"]["recompute"].values())
    assert c["summaries"]["oneiros"]["engine"]["remapped_layers"] == 3
    with pytest.raises(ValueError):
        compare({})


def test_ratio_and_lookup():
    assert ratio(1.0, 4.0) == 0.25 and ratio(None, 1.0) is None and ratio(1.0, 0.0) is None
    assert ratio(0, 0) == 1.0
    assert lookup({"a": {"b": 2}}, ("a", "b")) == 2
    assert lookup({"a": None}, ("a", "b")) is None and lookup({}, ("x",)) is None


def test_run_result_round_trip_and_http_summary():
    r = RunResult(
        ABC,
        counters=counters(1, 2),
        page_history=[(0.0, {"free": 3, "a/kv": 1}), (0.5, {"free": 2, "a/kv": 2})],
        rejected={"InvalidRequestError(prompt)": 2},
        rejected_examples={"InvalidRequestError(prompt)": "too long"},
        wall_s=4.5,
        clock_s=4.4,
        num_pages=4,
        page_bytes=65536,
        policy="swap",
        outputs={3: RequestTokens([7, 9], [-0.5, -0.2], [{7: -0.5, 8: -1.5}, {9: -0.2, 2: -2.0}])},
    )
    again = RunResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    assert r.summary()["rejected"] == 2
    http = RunResult(ABC, target="http://x")
    assert http.summary()["engine"] is None


def test_rejection_kinds():
    kind = rejection_kind(InvalidRequestError("too long", "prompt"))
    assert kind == "InvalidRequestError(prompt)"
    assert rejection_kind(UnknownModelError("no such model")) == "UnknownModelError"


# ---- report helpers ------------------------------------------------------------------------------
def test_pages_grouped_by_owner_kind():
    assert [page_kind(k) for k in ("free", "a/kv", "b/slab", "a/resident", "weird")] == [
        "free", "kv", "slab", "resident", "other"
    ]
    history = [
        (0.0, {"free": 4, "a/kv": 1, "b/kv": 1, "a/slab": 6, "a/resident": 2}),
        (1.0, {"free": 0, "a/kv": 5, "b/kv": 2, "a/slab": 5, "a/resident": 2}),
    ]
    times, series = pages_by_kind(history)
    assert times == [0.0, 1.0]
    assert series == {"resident": [2, 2], "slab": [6, 5], "kv": [2, 7], "free": [4, 0]}
    assert pages_by_kind([]) == ([], {"resident": [], "slab": [], "kv": [], "free": []})


def test_cdf():
    assert cdf([3.0, 1.0, 2.0, 2.0]) == ([1.0, 2.0, 2.0, 3.0], [0.25, 0.5, 0.75, 1.0])


def test_table_shows_values_and_ratios():
    base = RunResult(ABC, counters=counters(4, 0))
    fast = RunResult(scaled(ABC, 0.5), counters=counters(0, 3))
    headers, rows = table_rows(compare({"recompute": base, "oneiros": fast}))
    assert headers[0] == "policy" and "TTFT p99 ms" in headers and headers[-1] == "rejected"
    col = {h: i for i, h in enumerate(headers)}
    assert rows[0][0] == "recompute" and rows[0][col["TTFT p50 ms"]] == "1000.0"
    assert rows[1][col["TTFT p50 ms"]] == "500.0 (0.50x)"
    assert rows[1][col["preempt"]] == "0 (0.00x)" and rows[1][col["remaps"]] == "3"
    assert rows[0][col["goodput tok/s"]] == "-"
    text = format_plain_table(headers, rows)
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1


@pytest.mark.parametrize("use_rich", [False, None])
def test_print_table(use_rich):
    out = io.StringIO()
    results = {"recompute": RunResult(ABC), "oneiros": RunResult(scaled(ABC, 2.0))}
    print_table(results, slo_ttft_s=1.0, file=out, use_rich=use_rich)
    text = out.getvalue()
    assert "ratios against recompute" in text and "oneiros" in text and "(2.00x)" in text


def test_write_report_json_without_a_figure(tmp_path):
    results = {"recompute": RunResult(ABC, policy="recompute"), "oneiros": RunResult([C])}
    path = tmp_path / "out" / "report.json"
    report = write_report(results, path, None, config={"workload": "x", "path": tmp_path})
    data = json.loads(path.read_text())
    assert data["config"] == {"workload": "x", "path": str(tmp_path)}
    assert data["comparison"]["baseline"] == "recompute"
    assert set(data["runs"]) == {"recompute", "oneiros"}
    assert report["comparison"]["ratios"] == data["comparison"]["ratios"]
    assert load_results(path)["recompute"] == results["recompute"]


def test_percentile_is_the_distributions_and_none_when_empty():
    from oneiros.bench.metrics import distribution, percentile

    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    d = distribution(values)
    assert percentile(values, 0.5) == d["p50"] and percentile(values, 0.99) == d["p99"]
    assert percentile(values, 1.0) == 0.9 and percentile([], 0.5) is None
