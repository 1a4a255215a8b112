"""`oneiros bench`, `simulate` and `calibrate` end to end, and their errors."""

from __future__ import annotations

import json

import pytest

from oneiros.cli import main

TINY = ["--model", "a=random:llama-tiny", "--model", "b=random:opt-tiny"]


def test_simulate_c1_on_gh200_writes_the_report(tmp_path, capsys):
    out = tmp_path / "sim.json"
    rc = main([
        "simulate", "--hardware", "gh200", "--models", "c1", "--swap-space", "64GiB",
        "--workload", "poisson:rate=4,n=24,lengths=sharegpt,mix=c1,seed=3,max_total=2048",
        "--policies", "swap,oneiros", "--out", str(out), "--no-progress",
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"swap", "oneiros"}
    for run in report["runs"].values():
        assert len(run["records"]) == 24
        assert all(len(r["token_times"]) == r["output_len"] for r in run["records"])
    assert (tmp_path / "sim.png").stat().st_size > 0
    assert "ratios against swap" in capsys.readouterr().out


def test_bench_in_process_then_calibrate_from_its_trace(tmp_path, capsys):
    trace = tmp_path / "steps.jsonl"
    out = tmp_path / "bench.json"
    rc = main([
        "bench", *TINY, "--memory-budget", "64MiB", "--page-bytes", "262144",
        "--workload", "poisson:rate=50,n=12,lengths=alpaca,mix=a+b,seed=0,max_total=256",
        "--policies", "recompute,oneiros", "--trace-steps", str(trace), "--out", str(out),
        "--no-progress", "--threads", "1",
    ])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert [r["output_len"] for r in report["runs"]["recompute"]["records"]] == [
        r["output_len"] for r in report["runs"]["oneiros"]["records"]
    ]
    profile = tmp_path / "cpu.json"
    rc = main([
        "calibrate", "--trace", str(trace), "--model", "a=random:llama-tiny",
        "--model", "b=random:opt-tiny", "--out", str(profile),
    ])
    assert rc == 0
    fitted = json.loads(profile.read_text())
    assert 0 < fitted["compute_eff"] <= 1 and 0 < fitted["mem_eff"] <= 1
    assert "rms relative error" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,expected",
    [
        (["simulate", "--hardware", "tpu", "--models", "c1", "--workload", "poisson:rate=1,n=2"],
         "unknown hardware"),
        (["simulate", "--hardware", "gh200", "--models", "c9", "--workload", "poisson:rate=1,n=2"],
         "--models takes"),
        (["simulate", "--hardware", "gh200", "--models", "c1", "--workload", "poisson:rate=x"],
         "--workload"),
        (["simulate", "--hardware", "gh200", "--models", "c1"], "give --trace"),
        (["bench", *TINY, "--workload", "poisson:rate=1,n=2,mix=c1"], "not served"),
        (["calibrate", "--trace", "/nonexistent.jsonl", "--model", "a=random:llama-tiny"],
         "cannot read"),
    ],
)
def test_bad_input_names_the_problem(args, expected, capsys):
    assert main(args) == 2
    assert expected in capsys.readouterr().err


def test_bad_policy_list_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *TINY, "--workload", "poisson:rate=1,n=2", "--policies", "swap,lru"])
    assert e.value.code == 2
    assert "policies must be" in capsys.readouterr().err
