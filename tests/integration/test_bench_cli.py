"""`oneiros bench`, `simulate` and `calibrate` end to end, and their errors."""

from __future__ import annotations

import json

import pytest

from oneiros.cli import main

TINY = ["--model", "a=random:llama-tiny", "--model", "b=random:opt-tiny"]


def test_simulate_c1_on_gh200_writes_the_report(tmp_path, capsys):
    """A light load that never fills the GH200's memory: the report is written, but the command
    warns that no policy came under pressure and exits 3 rather than print ratios of noise."""
    out = tmp_path / "sim.json"
    rc = main([
        "simulate", "--hardware", "gh200", "--models", "c1", "--swap-space", "64GiB",
        "--workload", "poisson:rate=4,n=24,lengths=sharegpt,mix=c1,seed=3,max_total=2048",
        "--policies", "swap,oneiros", "--out", str(out), "--no-progress",
    ])
    assert rc == 3
    assert "no policy came under memory pressure" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"swap", "oneiros"}
    for run in report["runs"].values():
        assert len(run["records"]) == 24
        assert all(len(r["token_times"]) == r["output_len"] for r in run["records"])
    assert (tmp_path / "sim.png").stat().st_size > 0
    # vLLM's field names beside ours, per policy.
    for fields in report["vllm"].values():
        assert fields["completed"] == 24
        for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                    "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms",
                    "request_throughput", "output_throughput", "total_token_throughput"):
            assert fields[key] is not None and fields[key] > 0, key


def test_bench_repeats_and_vllm_fields(tmp_path, capsys):
    """One policy (nothing to compare, so no pressure warning): the spread of two repeats in the
    table, and vLLM's field names at the top of the JSON as `vllm bench serve` writes them."""
    out = tmp_path / "bench.json"
    rc = main([
        "bench", "--model", "a=random:llama-tiny", "--memory-budget", "34MiB",
        "--page-bytes", "65536", "--block-size", "4",
        "--workload", "poisson:rate=200,n=16,lengths=alpaca,mix=a,seed=1,max_total=256",
        "--policies", "recompute", "--repeats", "2", "--out", str(out), "--no-progress",
        "--threads", "1",
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out.read_text())
    assert report["completed"] == 16 and report["mean_ttft_ms"] > 0
    spread = report["repeats"]["recompute"]["tbt_p50"]
    assert len(spread["values"]) == 2 and spread["min"] <= spread["mean"] <= spread["max"]
    assert "±" in captured.out and "mean ±half range of 2 runs" in " ".join(captured.out.split())


def test_simulate_noise_gives_each_repeat_its_own_draw(tmp_path, capsys):
    """--noise: repeat i draws its step noise from seed i, so repeats differ and the table shows
    the spread the noise causes (without it the simulator repeats itself exactly)."""
    out = tmp_path / "noise.json"
    rc = main([
        "simulate", "--hardware", "gh200", "--models", "c1", "--noise", "0.1", "--repeats", "2",
        "--workload", "poisson:rate=4,n=12,lengths=sharegpt,mix=c1,seed=3,max_total=2048",
        "--policies", "oneiros", "--out", str(out), "--no-progress",
    ])
    assert rc == 0, capsys.readouterr().err
    values = json.loads(out.read_text())["repeats"]["oneiros"]["tbt_p50"]["values"]
    assert len(values) == 2 and values[0] != values[1]


def test_all_requests_failed_exits_nonzero(tmp_path, capsys):
    rc = main([
        "bench", "--model", "a=random:llama-tiny", "--max-model-len", "2",
        "--workload", "poisson:rate=50,n=4,lengths=alpaca,mix=a,seed=0", "--overlong", "reject",
        "--policies", "recompute", "--out", str(tmp_path / "b.json"), "--no-progress",
    ])
    assert rc == 4
    assert "every request failed" in capsys.readouterr().err


def test_table_fits_the_terminal():
    import io

    from oneiros.bench.report import print_table

    summary = {"ttft_s": {"p50": 0.0123, "p90": 0.02, "p99": 0.03},
               "tbt_s": {"p50": 0.004, "p90": 0.005, "p99": 0.009},
               "throughput_tok_s": 1234.5, "engine": {"preemptions": 3, "remapped_layers": 7},
               "rejected": 0}
    comparison = {"baseline": "swap", "slo": {},
                  "summaries": {"swap": summary, "oneiros": summary},
                  "ratios": {"swap": {}, "oneiros": {"ttft_p99": 0.5, "throughput_tok_s": 1.2}}}
    for width in (60, 80, 200):
        for use_rich in (True, False):
            buf = io.StringIO()
            print_table(comparison, file=buf, use_rich=use_rich, width=width)
            lines = buf.getvalue().splitlines()
            table = [line for line in lines[1:] if line.strip()]
            assert max(len(line) for line in table) <= width, (width, use_rich, lines)


def test_bench_in_process_then_calibrate_from_its_trace(tmp_path, capsys):
    trace = tmp_path / "steps.jsonl"
    out = tmp_path / "bench.json"
    rc = main([
        "bench", *TINY, "--memory-budget", "64MiB", "--page-bytes", "262144",
        "--workload", "poisson:rate=50,n=12,lengths=alpaca,mix=a+b,seed=0,max_total=256",
        "--policies", "recompute,oneiros", "--trace-steps", str(trace), "--out", str(out),
        "--no-progress", "--threads", "1",
    ])
    # The tiny models' KV cache never fills 64 MiB: the comparison says so (exit 3).
    assert rc == 3, capsys.readouterr().err
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
        (["simulate", "--hardware", "gh200", "--models", "c1", "--workload", "poisson:rate=1,n=2",
          "--noise", "1.5"], "sim_noise must be in [0, 1)"),
        (["simulate", "--hardware", "gh200", "--models", "c1", "--trace", "/nope.csv"],
         "--trace: no such file"),
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
