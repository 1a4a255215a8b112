"""benchmarks/prefix.py on a random-weight tiny model and a small trace sample of its own: both
scenarios run caching off and on, twice, and the JSON report holds what the benchmark quotes. The
numbers mean nothing here; this keeps the script from rotting and checks its accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def load_benchmark():
    return load_script(ROOT / "benchmarks" / "prefix.py", "prefix_benchmark")


def test_prefix_benchmark_smoke(tmp_path, capsys):
    trace = tmp_path / "conv.csv"
    rows = [f"2023-11-16 18:15:{s:02d}.0000000,{40 + 8 * s},{3 + s % 4}" for s in range(10)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    out = tmp_path / "prefix.json"
    bench = load_benchmark()
    assert bench.main([
        "--model", "random:llama-tiny", "--memory-budget", "64MiB", "--threads", "1",
        "--requests", "4", "--rate", "200", "--system-tokens", "64", "--min-question", "3",
        "--max-question", "9", "--output", "4", "--trace", str(trace), "--sessions", "2",
        "--turns", "3", "--time-scale", "100", "--max-output", "4", "--repeats", "2",
        "--out", str(out),
    ]) == 0
    report = json.loads(out.read_text())
    assert "TTFT P50 on/off per repeat" in capsys.readouterr().out
    assert report["sessions"]["workload"] == {"requests": 6, "follow_ups": 4}
    for scenario in ("system", "sessions"):
        r = report[scenario]
        h = r["headline"]
        assert set(r["repeats"]) == {"off", "on"}  # the spread over the two repeats
        assert h["off"]["hit_rate"]["max"] == 0 and h["on"]["hit_rate"]["min"] > 0
        # Hits are prefill skipped: caching on computes fewer prompt tokens, every repeat.
        for on, off in zip(h["on"]["prefill_tokens"]["values"],
                           h["off"]["prefill_tokens"]["values"], strict=True):
            assert on < off
        assert len(h["ttft_p50_ratio"]) == 2 and all(x > 0 for x in h["ttft_p50_ratio"])
        for name in ("off", "on"):
            for key in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tbt_p99_s", "throughput_tok_s"):
                assert h[name][key]["min"] > 0, (scenario, name, key)
        runs = r["runs"]
        assert set(runs) == {"off", "on"} and all(len(x["records"]) == len(runs["off"]["records"])
                                                   for x in runs.values())
    # The system prompt: every request after the first finds its 64 tokens (4 blocks of 16).
    system = report["system"]["runs"]["on"]["counters"]["m"]
    assert system["prefix_cache_hits"] >= 3 * 64


def test_prefix_benchmark_refuses_bad_arguments(capsys):
    bench = load_benchmark()
    with pytest.raises(SystemExit) as e:
        bench.main(["--scenarios", "nothing"])
    assert e.value.code == 2 and "--scenarios" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--trace", "/no/such/trace.csv"])
    assert "no such file" in capsys.readouterr().err
