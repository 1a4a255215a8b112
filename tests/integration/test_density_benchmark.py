"""benchmarks/density.py in a smoke run: a small trace sample of its own (Azure format), Llama-3-8B
geometry in the simulator, N up to 3 per policy; the JSON report has every policy's largest N and
runs, and bad arguments are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "density.py"


def sample_trace(path: Path, n: int = 24) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for k in range(n):
        lines.append(f"2023-11-16 18:15:{k * 2:02d}.0000000,{200 + 37 * k % 900},{20 + k % 50}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_density_smoke(tmp_path):
    out = tmp_path / "density.json"
    trace = sample_trace(tmp_path / "trace.csv")
    r = run("--trace", str(trace), "--requests", "24", "--time-scale", "1", "--max-models", "3",
            "--memory-fraction", "0.3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GPUs for 32" in r.stdout
    report = json.loads(out.read_text())
    assert report["hardware"] == "h200" and report["requests"] == 24
    res = report["results"]
    assert set(res) == {"static", "all-resident", "offload", "oneiros"}
    assert res["static"]["largest_n"] == 1 and res["static"]["gpus_for_32"] == 32
    # 0.3 of 141 GB holds two 8B models: all-resident stops there, the others go on.
    assert [x["fits"] for x in res["all-resident"]["runs"]] == [True, True, False]
    third = res["oneiros"]["runs"][2]
    assert third["fits"] and third["oversubscribed"] and third["completed"] == 24
    for name, found in res.items():
        assert all(x["completed"] == x["requests"] for x in found["runs"] if x["fits"]), name


def test_density_mixed_model_set(tmp_path):
    out = tmp_path / "mixed.json"
    trace = sample_trace(tmp_path / "trace.csv")
    r = run("--trace", str(trace), "--requests", "24", "--time-scale", "1", "--max-models", "3",
            "--model-set", "mixed", "--policies", "oneiros", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "llama-3-8b+llama-3.2-3b+llama-3.2-1b" in r.stdout
    report = json.loads(out.read_text())
    assert report["args"]["model_set"] == "mixed"
    assert all(x["completed"] == 24 for x in report["results"]["oneiros"]["runs"])


def test_density_bad_arguments(tmp_path):
    r = run("--policies", "nope", "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "unknown policy 'nope'" in r.stderr
    r = run("--trace", str(tmp_path / "missing.csv"))
    assert r.returncode == 2 and "no trace at" in r.stderr and "Traceback" not in r.stderr
