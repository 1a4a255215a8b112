"""The GPU benchmark scripts (benchmarks/gpu) in their CPU smoke mode: each runs as a subprocess
with `--tiny --device cpu` and must write a JSON report with the expected keys and positive times.
The numbers themselves mean nothing on a CPU; this only keeps the scripts from rotting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "benchmarks" / "gpu"

# The subprocesses get one intra-op thread, like the in-process tests (see the fixture).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def run_script(name: str, tmp_path: Path, *extra: str, timeout: float = 180) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run(
        [sys.executable, str(GPU / f"{name}.py"), "--tiny", "--device", "cpu", "--out", str(out),
         *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{name}.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(out.read_text())
    for key in ("benchmark", "args", "device_name", "versions", "peak"):
        assert key in report, key
    assert report["benchmark"] == name
    assert report["device_name"] == "cpu"
    assert report["args"]["tiny"] is True
    assert report["versions"]["torch"]
    assert report["peak"]["hardware"] == "cpu" and report["peak"]["peak_bw"] > 0
    assert proc.stdout.strip(), "no table printed"
    return report


def test_kernel(tmp_path):
    pytest.importorskip("triton")
    report = run_script("kernel", tmp_path)
    assert report["versions"]["triton"]
    assert report["env"]["TRITON_INTERPRET"] == "1"
    (row,) = report["results"]
    assert (row["batch"], row["context"]) == (2, 64)
    assert row["kv_bytes"] == 2 * 64 * 2 * 2 * 16 * 4  # B x ctx x (K, V) x Hkv x D x float32
    for impl in ("triton", "sdpa", "ref"):
        assert row[f"{impl}_s"] > 0 and row[f"{impl}_bw"] > 0 and row[f"{impl}_frac_peak"] > 0
    assert row["triton_over_sdpa"] > 0
    assert row["max_abs_err_triton_vs_sdpa"] < 1e-4  # float32: the kernel is exact up to rounding


def test_model_step(tmp_path):
    report = run_script("model_step", tmp_path)
    runs = report["results"]
    assert {(r["cuda_graphs"], r["attention"]) for r in runs} == {(True, "torch"), (False, "torch")}
    for run in runs:
        assert [b["batch"] for b in run["batches"]] == [1, 2]
        for b in run["batches"]:
            assert b["pure_decode"], "timed steps were not pure decode steps of the batch"
            assert b["step_s"] > 0 and b["roofline_s"] > 0 and b["tokens_per_s"] > 0
            assert 0 < b["fraction_of_roofline"]
            assert b["weight_bytes_per_step"] > 0 and b["kv_bytes_per_step"] > 0
    assert report["target"]["batch"] == 32 and report["target"]["met"] is None  # no batch 32


def test_copies(tmp_path):
    report = run_script("copies", tmp_path)
    assert report["probe"]["h2d"] > 0 and report["probe"]["d2h"] > 0
    assert [r["mib"] for r in report["bandwidth"]] == [1, 2, 4, 8, 16]
    for r in report["bandwidth"]:
        assert r["h2d_bw"] > 0 and r["d2h_bw"] > 0 and r["h2d_s"] > 0 and r["d2h_s"] > 0
    (row,) = report["streaming"]["rows"]
    assert (row["batch"], row["alpha"]) == (2, 1)
    assert len(row["missing_layers"]) == 1 and row["pure_decode"]
    assert row["t0_s"] > 0 and row["t_alpha_s"] > 0 and row["copy_s_per_step"] > 0
    assert 0.0 <= row["hidden_fraction"] <= 1.0
    # The engine streamed exactly what the pass plan says.
    assert row["engine_bytes_match"] and row["engine_copy_s_per_step"] > 0


def test_e2e(tmp_path):
    report = run_script("e2e", tmp_path)
    one, hf = report["oneiros"], report["transformers"]
    assert one["generated_tokens"] == one["expected_tokens"] == report["workload"]["output_tokens"]
    assert one["tokens_per_s"] > 0 and one["wall_s"] > 0
    assert hf["tokens_per_s"] > 0 and hf["wall_s"] > 0 and hf["compiled"] is False
    assert report["ratio"] > 0 and "met" in report["target"]
    # Same weights, float32: the greedy outputs start alike at least.
    assert report["greedy_agreement"]["first_token_match"] == 1.0


def _common():
    return load_script(GPU / "common.py", "gpu_bench_common")


def test_peak_bandwidth_from_the_device_name():
    common = _common()
    assert common.resolve_peak("NVIDIA H100 80GB HBM3", None, None)["hardware"] == "h100-sxm"
    assert common.resolve_peak("NVIDIA H100 PCIe", None, None)["hardware"] == "h100-pcie"
    h200 = common.resolve_peak("NVIDIA H200", None, None)
    assert h200["hardware"] == "h200" and h200["peak_bw"] == 4.8e12
    assert common.resolve_peak("NVIDIA GH200 480GB", None, None)["hardware"] == "gh200"
    assert common.resolve_peak("NVIDIA GH200 480GB", None, None)["peak_bw"] == 4.0e12
    assert common.resolve_peak("cpu", None, 1e9)["peak_bw"] == 1e9
    assert common.resolve_peak("NVIDIA H200", "h100-sxm", None)["peak_bw"] == 3.35e12


def test_run_all_is_executable():
    script = GPU / "run_all.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
