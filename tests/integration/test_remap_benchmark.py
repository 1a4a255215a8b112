"""benchmarks/remap.py: a tiny run on two random-weight models (seconds) must write its JSON with
every policy's latencies, counters and cool-down, find memory pressure (preemptions under swap and
pie, remapped layers under oneiros) and identical outputs, in each of two repeats; a roomy budget
must raise the no-pressure warning (exit status 3). The output comparison itself (divergence
position, margins, verdicts) is checked on hand-made token lists."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from oneiros.bench.runner import RequestTokens
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
# About 24 short requests within 0.3 s: they meet in the engine whatever the machine's speed, so
# that 4 KV pages (256 llama-tiny or 128 opt-tiny tokens) are short under every policy.
TINY = ["--models", "a=random:llama-tiny,b=random:opt-tiny@1", "--page-bytes", "65536",
        "--block-size", "4", "--duration", "0.3", "--rate", "30", "--min-prompt", "8",
        "--max-prompt", "40", "--min-output", "8", "--max-output", "24", "--cooldown", "5",
        "--timeline-points", "20"]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def remap():
    yield load_script(ROOT / "benchmarks/remap.py", "remap_benchmark")
    del sys.modules["remap_benchmark"]


def run(remap, tmp_path: Path, *extra: str, status: int = 0) -> dict:
    out = tmp_path / "remap.json"
    assert remap.main([*TINY, *extra, "--out", str(out)]) == status
    return json.loads(out.read_text())


def test_tiny_run_under_pressure(remap, tmp_path, capsys):
    doc = run(remap, tmp_path, "--kv-pages", "4", "--repeats", "2")
    printed = capsys.readouterr().out
    assert list(doc["results"]) == ["swap", "pie", "oneiros"]
    n = doc["num_requests"]
    assert n == doc["workload"]["requests"] > 5
    for policy, r in doc["results"].items():
        s = r["summary"]
        assert s["requests"] == n and s["rejected"] == 0
        for key in ("ttft_s", "tbt_s", "tpot_s", "max_gap_s"):
            assert s[key]["p50"] > 0 and s[key]["p99"] >= s[key]["p50"], (policy, key)
        assert s["throughput_tok_s"] > 0
        assert sorted(int(k) for k in r["outputs"]) == list(range(n))
        assert len(r["records"]) == n
        assert r["cooldown"]["layers_missing_at_end"] == {"a": [], "b": []}
        assert r["page_timeline"]["t"] and r["slab_summary"].keys() == {"a", "b"}
        assert 0 < r["cpu_s"] and len(r["loadavg"]) == 3
    for pressure in doc["memory_pressure"]:
        for policy in ("swap", "pie"):
            assert pressure[policy]["preemptions"] > 0 and pressure[policy]["swap_out_bytes"] > 0
        assert pressure["oneiros"]["remapped_layers"] > 0
    assert doc["warnings"] == [] and "WARNING" not in printed
    # Every run after the first is compared with swap's first run, request by request.
    assert doc["results"]["swap"]["outputs_vs_first"] is None
    (again,) = doc["repeats"]
    for policy, c in [*((p, doc["results"][p]["outputs_vs_first"]) for p in ("pie", "oneiros")),
                      *((p, r["outputs_vs_first"]) for p, r in again.items())]:
        assert c["identical"] == c["compared"] == c["requests"] == n, (policy, c["differences"])
        assert c["logprob_max_abs_diff"] < 1e-3
    assert f"oneiros (repeat 1) vs swap: {n} of {n} requests identical" in printed
    assert f"swap (repeat 2) vs swap: {n} of {n} requests identical" in printed
    assert doc["outputs_identical"] and doc["suspicious_differences"] == 0
    assert [set(r) for r in doc["ratios_vs_first"]] == [{"swap", "pie", "oneiros"}] * 2
    spread = doc["spread"]["oneiros"]["tpot_p99"]
    assert len(spread["ratios"]) == 2 and spread["ratio_min"] <= spread["ratio_max"]
    assert "ratios over 2 repeats" in printed


def test_roomy_budget_warns(remap, tmp_path, capsys):
    doc = run(remap, tmp_path, "--kv-pages", "200", "--policies", "swap,oneiros", status=3)
    assert doc["memory_pressure"] == [
        {p: {"preemptions": 0, "swap_out_bytes": 0, "remapped_layers": 0}
         for p in ("swap", "oneiros")}]
    (warning,) = doc["warnings"]
    assert warning.startswith("no policy came under memory pressure")
    assert f"WARNING: {warning}" in capsys.readouterr().out


def test_output_comparison(remap):
    def tokens(ids: list[int], tops: list[dict[int, float]]) -> RequestTokens:
        return RequestTokens(ids, [top[t] for t, top in zip(ids, tops, strict=True)], tops)

    close = {5: -0.69310, 6: -0.69320}  # margin 1e-4: a near-tie
    far = {5: -0.1, 6: -2.4}  # margin 2.3
    ref = {0: tokens([1, 5], [{1: -0.1, 2: -3.0}, close]),
           1: tokens([1, 5], [{1: -0.1, 2: -3.0}, far]),
           2: tokens([3], [{3: -0.2, 4: -2.0}]),
           3: tokens([3], [{3: -0.2, 4: -2.0}])}
    run = {0: tokens([1, 6], [{1: -0.1, 2: -3.0}, {6: -0.69312, 5: -0.69315}]),
           1: tokens([1, 6], [{1: -0.1, 2: -3.0}, {6: -0.5, 5: -0.9}]),
           2: tokens([3], [{3: -0.2 + 2e-6, 4: -2.0}])}
    c = remap.compare_outputs(ref, run, near_tie=1e-3)
    assert (c["requests"], c["compared"], c["identical"]) == (4, 3, 1)
    assert c["only_in_reference"] == [3] and c["only_in_this_run"] == []
    assert c["logprob_max_abs_diff"] == pytest.approx(2e-6)
    tie, bug = c["differences"]
    assert (tie["request"], tie["position"], tie["reference_token"], tie["token"]) == (0, 1, 5, 6)
    assert tie["margin"] == pytest.approx(1e-4) and tie["verdict"] == "near-tie"
    assert tie["margin_in_this_run"] == pytest.approx(3e-5)
    assert bug["request"] == 1 and bug["margin"] == pytest.approx(2.3)
    assert bug["verdict"] == "suspicious" and c["suspicious"] == 1
    text = remap.outputs_text("oneiros", "swap", c)
    assert "oneiros vs swap: 1 of 4 requests identical (3 compared)" in text
    assert "request 1: position 1, token 5 -> 6, margin 2.3 (this run 0.4): suspicious" in text
    assert remap.first_difference([1, 2], [1, 2, 3]) == 2
    assert remap.first_difference([1, 2], [1, 2]) is None
