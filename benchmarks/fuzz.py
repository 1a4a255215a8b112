"""Schema-based fuzzing of the HTTP server with schemathesis: every operation of the server's own
OpenAPI document, valid and invalid inputs, checked for 5xx, undocumented status codes and content
types, response bodies against their schemas, 405 with Allow, and invalid data being refused.

    python benchmarks/fuzz.py                              # a server of its own, 10 minutes
    python benchmarks/fuzz.py --max-time 60 --out fuzz.json
    python benchmarks/fuzz.py --url http://127.0.0.1:8000 --api-key KEY

Without --url it serves two tenants of a tiny random Llama with the SmolLM2 tokenizer (real text,
fast steps, a 96-token context so generations stay short). Reports the requests the server
answered (its own response counter, by endpoint and status), schemathesis' test cases and failures,
and the engine's integrity check afterwards. Exit status 0 when schemathesis found nothing and the
server answered no 5xx.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from oneiros.server.launch import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,negative_data_rejection,"
    "unsupported_method,allow_header_conformance,missing_required_header"
)


def responses(url: str, headers: dict[str, str]) -> Counter[str]:
    """The server's response counter: 'endpoint status' -> count."""
    out: Counter[str] = Counter()
    text = httpx.get(url + "/metrics", headers=headers, timeout=60).text
    for m in re.finditer(
        r'^oneiros_http_responses_total\{endpoint="([^"]*)",status="(\d+)"\} ([0-9.e+]+)$',
        text, re.M,
    ):
        out[f"{m.group(1)} {m.group(2)}"] += int(float(m.group(3)))
    return out


def run_schemathesis(url: str, max_time: float, seed: int, workers: int,
                     api_key: str | None, report: Path) -> tuple[int, str]:
    st = Path(sys.executable).parent / "st"
    cmd = [str(st), "run", url + "/openapi.json", "--checks", CHECKS, "--max-time",
           str(int(max_time)), "--seed", str(seed), "--workers", str(workers), "--report", "ndjson",
           "--report-ndjson-path", str(report), "--no-color"]
    if api_key:
        cmd += ["--header", f"Authorization: Bearer {api_key}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=report.parent)
    return proc.returncode, proc.stdout + proc.stderr


def summary_of(output: str) -> dict[str, Any]:
    """Test cases and failures from schemathesis' closing summary."""
    m = re.search(r"(\d+) generated, (\d+) (passed|found (\d+) unique failures?)", output)
    out: dict[str, Any] = {"test_cases": int(m.group(1)) if m else None}
    if m and m.group(4):
        out["unique_failures"] = int(m.group(4))
    elif m:
        out["unique_failures"] = 0
    return out


def fuzz(url: str, max_time: float, seed: int = 0, workers: int = 1,
         api_key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    before = responses(url, headers)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        rc, output = run_schemathesis(url, max_time, seed, workers, api_key,
                                      Path(tmp) / "report.ndjson")
        elapsed = time.monotonic() - t0
    after = responses(url, headers)
    delta = after - before
    by_status: Counter[str] = Counter()
    for key, n in delta.items():
        by_status[key.split()[1]] += n
    memory = httpx.get(url + "/v1/memory", params={"check": "true"}, headers=headers,
                       timeout=120).json()
    server_errors = sum(n for s, n in by_status.items() if s.startswith("5"))
    return {
        "schemathesis_exit_code": rc,
        **summary_of(output),
        "elapsed_s": round(elapsed, 1),
        "requests_answered": sum(delta.values()),
        "responses_by_status": dict(sorted(by_status.items())),
        "generation_200": delta.get("/v1/completions 200", 0)
        + delta.get("/v1/chat/completions 200", 0),
        "server_errors_5xx": server_errors,
        "integrity": memory.get("integrity"),
        "kv_blocks_used_after": memory.get("kv_blocks_used"),
        "ok": rc == 0 and server_errors == 0 and memory.get("integrity") == "ok",
        "output_tail": output[-3000:],
    }


SERVER_CODE = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.helpers import tiny_llama_dir
from oneiros.config import EngineConfig
from oneiros.server.app import serve
path = str(tiny_llama_dir(sys.argv[2]))
sys.exit(serve(EngineConfig(models={{"a": path, "b": path}}, memory_budget="256MiB",
                            max_model_len=96), "127.0.0.1", int(sys.argv[1]), max_queue=64,
               log_level="warning"))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="fuzz this running server (default: start one)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-time", type=float, default=600.0, help="seconds of fuzzing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="results/fuzz.json")
    args = p.parse_args(argv)
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        tmp = tempfile.mkdtemp(prefix="oneiros-fuzz-")
        proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE.format(root=str(ROOT)),
                                 str(port), tmp + "/tiny"])
        try:
            wait_healthy(url, proc, 300, poll_s=0.5)
        except RuntimeError as e:
            print(f"the server did not start: {e}", file=sys.stderr)
            return 1
    try:
        report = fuzz(url, args.max_time, args.seed, args.workers, args.api_key)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    shown = {k: v for k, v in report.items() if k != "output_tail"}
    print(json.dumps(shown, indent=1))
    print(f"wrote {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
