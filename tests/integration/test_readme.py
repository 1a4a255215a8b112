"""Every example of the README runs as written: its ```sh blocks as bash scripts (a `serve` command
started in the background, on a free port, for the blocks after it, and stopped with SIGTERM at the
end: it must exit 0), its ```python blocks as scripts, in a scratch directory. The simulator's trace
is the Azure trace from ../shared/traces when present, else a small sample in the same format."""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from oneiros.server.launch import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
TRACE = "AzureLLMInferenceTrace_conv.csv"
BLOCK = re.compile(r"^```(sh|python)\n(.*?)^```", re.S | re.M)

pytestmark = pytest.mark.slow


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def sample_trace(path: Path, n: int = 300, seed: int = 0) -> None:
    """An Azure-format trace (TIMESTAMP, ContextTokens, GeneratedTokens) with bursts of
    conversation-like lengths."""
    rng = random.Random(seed)
    t = datetime(2023, 11, 16, 18, 0, 0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        for _ in range(n):
            t += timedelta(seconds=rng.expovariate(1 / 0.25) * (5 if rng.random() < 0.1 else 1))
            w.writerow([t.strftime("%Y-%m-%d %H:%M:%S.%f0"), rng.randint(200, 2500),
                        rng.randint(20, 450)])


def test_every_readme_example_runs(tmp_path: Path) -> None:
    found = blocks()
    assert any(kind == "python" for kind, _ in found) and any("serve" in b for _, b in found)
    shared = ROOT.parent / "shared" / "traces" / TRACE
    if shared.is_file():
        shutil.copy(shared, tmp_path / TRACE)
    else:
        sample_trace(tmp_path / TRACE)
    port = free_port()
    bin_dir = str(Path(sys.executable).parent) + "/"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server: subprocess.Popen | None = None
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    try:
        for kind, text in found:
            text = text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            text = text.replace(".venv/bin/", bin_dir)
            text = text.replace(" benchmarks/", f" {ROOT}/benchmarks/")
            if kind == "python":
                r = subprocess.run([sys.executable, "-c", text], cwd=tmp_path, env=env,
                                   capture_output=True, text=True, timeout=600)
                assert r.returncode == 0, (text, r.stderr[-3000:])
                assert r.stdout.strip(), text
                continue
            if "oneiros serve" in text and "--dry-run" not in text:
                assert server is None, "one server at a time"
                command = text.replace("\\\n", " ").strip() + f" --port {port}"
                server = subprocess.Popen(["bash", "-c", "exec " + command], cwd=tmp_path,
                                          env=env, stdout=log, stderr=subprocess.STDOUT)
                wait_healthy(f"http://127.0.0.1:{port}", server, 300, tmp_path / "serve.log")
                continue
            r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + text], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, (text, r.stdout[-2000:], r.stderr[-3000:])
        assert server is not None
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        log.close()
    assert (tmp_path / "results" / "bench.json").is_file()
    assert (tmp_path / "results" / "profile.json").is_file()
    assert (tmp_path / "results" / "prefix.json").is_file()


def test_make_targets_of_the_readme_exist() -> None:
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"^    make (\w+)$", text, re.M):
        r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, (target, r.stderr)


def test_sample_trace_is_read_as_an_azure_trace(tmp_path: Path) -> None:
    from oneiros.bench.workloads import read_azure_trace

    sample_trace(tmp_path / "t.csv", n=50)
    assert len(read_azure_trace(tmp_path / "t.csv")) == 50
