"""benchmarks/paper.py: the checks on fabricated results, and one small row run for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "paper.py"


@pytest.fixture(scope="module")
def paper():
    yield load_script(SCRIPT, "paper_grid")
    del sys.modules["paper_grid"]


def result(**kw) -> dict:
    base = dict(tpot_p99=0.1, tbt_p99=0.1, max_gap_p99=1.0, ttft_p99=10.0, ttft_p50=1.0,
                latency_p50=5.0, throughput=100.0, preemptions=10, remapped_layers=0)
    base.update(kw)
    return base


def test_checks_judge_direction_pressure_and_preemptions(paper):
    row = paper.Row("hw/r", "r", "spec", None, {"swap": None}, {"swap": paper.VS_VLLM})
    row.results = {"ours": result(tpot_p99=0.05, ttft_p99=5.0, throughput=90.0, preemptions=12,
                                  remapped_layers=3),
                   "swap": result()}
    got = {cid: ok for cid, ok, _ in paper.checks(row)}
    assert got == {"hw/r/swap/pressure": True, "hw/r/swap/tpot_p99": True,
                   "hw/r/swap/ttft_p99": True, "hw/r/swap/throughput": False,
                   "hw/r/swap/preemptions": False}
    row.results["swap"]["preemptions"] = 0
    row.results["ours"]["remapped_layers"] = 0
    assert not dict((c, ok) for c, ok, _ in paper.checks(row))["hw/r/swap/pressure"]


def test_rows_against_pie_on_the_fast_link_need_half_its_ttft(paper):
    row = paper.Row("hw/r", "r", "spec", None, {"pie": None}, {"pie": paper.VS_PIE})
    row.results = {"ours": result(ttft_p99=5.0, remapped_layers=3), "pie": result()}
    assert {cid: ok for cid, ok, _ in paper.checks(row)}["hw/r/pie/ttft_half"]  # -50%
    row.results["ours"]["ttft_p99"] = 5.1
    assert not {cid: ok for cid, ok, _ in paper.checks(row)}["hw/r/pie/ttft_half"]
    row.slow_link = True  # judged against the best baseline there instead
    assert "hw/r/pie/ttft_half" not in {cid for cid, _, _ in paper.checks(row)}


def test_slow_link_rows_compare_with_the_best_baseline(paper):
    row = paper.Row("hw/r", "r", "spec", None, {"swap": None, "pie": None}, {}, focus=(),
                    bursty=True, slow_link=True)
    row.results = {"ours": result(tpot_p99=0.104, ttft_p99=4.0), "swap": result(ttft_p99=9.0),
                   "pie": result(tpot_p99=0.2, ttft_p99=8.0)}
    got = {cid: ok for cid, ok, _ in paper.checks(row)}
    assert got["hw/r/slow/tpot_p99"] and got["hw/r/slow/ttft_p99"]  # 1.04x and 0.5x
    row.results["ours"]["ttft_p99"] = 4.1
    assert not {cid: ok for cid, ok, _ in paper.checks(row)}["hw/r/slow/ttft_p99"]


def test_explained_exceptions_are_read_from_their_section(paper, tmp_path):
    doc = tmp_path / "grid.md"
    doc.write_text("# grid\n\n## Explained exceptions\n\n- `a/b/c`: measured cause\n"
                   "- not a check\n\n## Failed checks (this run)\n\n- `x/y`\n")
    assert paper.exceptions(doc) == {"a/b/c": "measured cause"}
    assert paper.exceptions(tmp_path / "missing.md") == {}


def test_one_small_row_runs_and_rechecks_from_its_json(tmp_path):
    out = tmp_path / "grid.json"
    cmd = [sys.executable, str(SCRIPT), "--requests", "24", "--hardware", "gh200",
           "--only", "gh200/c2-sharegpt-1$", "--json", str(out), "--out", str(tmp_path / "g.md")]
    first = subprocess.run(cmd + ["--jobs", "2"], capture_output=True, text=True, timeout=600)
    assert first.returncode in (0, 1), first.stderr
    saved = json.loads(out.read_text())
    assert [r["id"] for r in saved["rows"]] == ["gh200/c2-sharegpt-1"]
    assert set(saved["rows"][0]["results"]) == {"ours", "swap", "pie"}
    again = subprocess.run(cmd + ["--checks-only"], capture_output=True, text=True, timeout=600)
    assert again.returncode == first.returncode
    judged = [line for line in first.stdout.splitlines() if line[:3] in ("ok ", "BAD", "exc")]
    assert judged and judged == [line for line in again.stdout.splitlines()
                                 if line[:3] in ("ok ", "BAD", "exc")]
    # In one process, row by row: the same results as the two processes gave.
    one = tmp_path / "one.json"
    alone = subprocess.run(cmd[:-4] + ["--json", str(one), "--out", str(tmp_path / "g1.md")],
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == first.returncode, alone.stderr
    assert json.loads(one.read_text())["rows"] == saved["rows"]


def test_bad_jobs_is_a_usage_error(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--jobs", "0", "--json", str(tmp_path / "g.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--jobs must be at least 1, got 0" in done.stderr
    assert not (tmp_path / "g.json").exists()
