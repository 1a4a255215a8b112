"""benchmarks/turn_gaps.py: the gap classification on a made-up schedule, and a small real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "turn_gaps.py"


@pytest.fixture(scope="module")
def turn_gaps():
    yield load_script(SCRIPT, "turn_gaps")
    del sys.modules["turn_gaps"]


def test_gaps_are_split_by_the_other_models_turns_they_span(turn_gaps):
    # Turns: a (two steps), b, c, a, b, a. Steps end at 1..6 s; each step is 1 s long.
    order = ["a", "a", "b", "c", "a", "b", "a"]
    steps = [(float(k), k + 1.0, [m], 2 if m == "a" else 1) for k, m in enumerate(order)]
    result = SimpleNamespace(records=[
        # a's request: tokens at the ends of a's steps: gaps 1 (inside the turn), 3 (b and c
        # ran between), 2 (b ran between)
        SimpleNamespace(model="a", token_times=[1.0, 2.0, 5.0, 7.0]),
        # b's request: one gap spanning c and a
        SimpleNamespace(model="b", token_times=[3.0, 6.0]),
    ])
    got = turn_gaps.classify(result, steps)
    assert got["gaps"] == 4
    assert got["two_turn_share"] == pytest.approx(2 / 4)
    assert got["two_turn_median_s"] == pytest.approx(3.0)
    assert got["other_gaps_p99_s"] == pytest.approx(1 + 0.99 * (2 - 1))
    # turns last 2, 1, 1, 1, 1, 1 s; batches 2 or 1
    assert got["turn_p90_s"] == pytest.approx(1.5)
    assert got["batch_p90"] == pytest.approx(2.0)


def test_a_small_row_runs_and_writes_every_run(tmp_path):
    out = tmp_path / "gaps.json"
    cmd = [sys.executable, str(SCRIPT), "--hardware", "gh200", "--rate", "16", "--requests", "30",
           "--seeds", "0", "--policies", "oneiros,swap", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(r["policy"], r["seed"]) for r in runs] == [("oneiros", 0), ("swap", 0)]
    for r in runs:
        assert r["gaps"] > 0 and 0.0 <= r["two_turn_share"] <= 1.0
        assert r["tbt_p99_s"] > 0 and r["turn_p90_s"] > 0
    assert "two-turn gaps (%)" in done.stdout


def test_an_unknown_policy_is_a_usage_error(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--policies", "oneiros,vllm",
           "--out", str(tmp_path / "g.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--policies: choose from" in done.stderr and "vllm" in done.stderr
    assert not (tmp_path / "g.json").exists()
