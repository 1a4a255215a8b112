"""Soak test for the HTTP server: N concurrent clients for M seconds against a loopback server,
mixing valid requests (completions and chat, streamed and not), invalid ones, and clients that
disconnect mid-stream or mid-request. Reports requests served, responses by status, latency
percentiles, and the engine's KV/page accounting before and after (which must match: no leaked KV
blocks, weights pages unchanged, every page owned once, engine integrity check passing).

    python benchmarks/soak.py                       # starts a server (two SmolLM2 tenants) itself
    python benchmarks/soak.py --clients 8 --duration 60 --out soak.json
    python benchmarks/soak.py --url http://127.0.0.1:8000 --api-key KEY   # a running server
    python benchmarks/soak.py --hol-probe           # a 10 MB prompt while another model streams
    python benchmarks/soak.py --faults "copy:0.01,restore:0.01,step:0.01,slow:0.05@0.2" \
        --clients 32 --duration 300                 # fault mode

Head-of-line probe: a stream of one model runs while a 10 MB prompt is sent to the other; the
stream's largest gap between chunks is reported against its median (target: at most 3x).
Fault mode: the server runs with injected faults (ONEIROS_FAULTS); every valid request must end
with tokens or a clean OpenAI error (an error body, or an error event in its stream), none lost
(no transport error, no stream cut without an error event), and the accounting must equal the
idle baseline at the end.

Only loopback servers are accepted. Exit status 0 when the accounting matches and no request got
an unexpected answer (a 5xx other than a clean injected failure, or a valid request refused other
than by the queue limit), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from oneiros.bench.metrics import percentile
from oneiros.server.launch import free_port, wait_healthy

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "List three colours:",
    "def fibonacci(n):",
    "The quick brown fox",
    "Water boils at",
]
QUESTIONS = [
    "What is the capital of France?",
    "Name a planet in our solar system.",
    "Give me a synonym for happy.",
    "What is 2 + 2?",
]


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _percentile(values: list[float], q: float) -> float | None:
    v = percentile(values, q)
    return None if v is None else round(v, 4)


# ---- the server under test -----------------------------------------------------------------------
SERVER_CODE = """
import json, sys, torch
torch.set_num_threads({threads})
from oneiros.config import EngineConfig
from oneiros.server.app import serve
serve(EngineConfig(**json.loads(sys.argv[1])), "127.0.0.1", {port}, None, {max_queue},
      drain_timeout=30.0, log_level="info")
"""


class LocalServer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        models = dict(kv.split("=", 1) for kv in args.models.split(","))
        cfg = {
            "models": models,
            "memory_budget": args.memory_budget,
            "max_model_len": args.max_model_len,
        }
        code = SERVER_CODE.format(threads=args.threads, port=self.port, max_queue=args.max_queue)
        self.log_path = Path(
            args.server_log or tempfile.mkstemp(prefix="oneiros-soak-", suffix=".log")[1]
        )
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.faults:
            env.update(ONEIROS_FAULTS=args.faults, ONEIROS_FAULTS_SEED=str(args.seed))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
        )

    def wait_ready(self, timeout: float) -> None:
        wait_healthy(self.url, self.proc, timeout, self.log_path, poll_s=0.5)

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        """SIGTERM (graceful drain), then wait; returns how it went."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        text = self.log_path.read_text(errors="replace")
        return {
            "exit_code": rc,
            "shutdown_s": round(time.monotonic() - t0, 2),
            "tracebacks_in_log": text.count("Traceback (most recent call last)"),
            "log": str(self.log_path),
        }


# ---- client behaviours ---------------------------------------------------------------------------
class Stats:
    def __init__(self) -> None:
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.by_kind_status: Counter[str] = Counter()
        self.latency: list[float] = []  # valid requests answered in full
        self.ttft: list[float] = []  # streamed valid requests: time to the first content chunk
        self.tokens = 0
        self.unexpected: list[str] = []
        # Valid requests by how they ended: tokens, a clean error, or lost (fault mode's ledger).
        self.ended: Counter[str] = Counter()

    def record(self, kind: str, status: int | str, ok_statuses: tuple[int, ...]) -> None:
        self.by_kind[kind] += 1
        self.by_status[str(status)] += 1
        self.by_kind_status[f"{kind}:{status}"] += 1
        if status not in ok_statuses and len(self.unexpected) < 50:
            self.unexpected.append(f"{kind}: {status}")


def _valid_body(rng: random.Random, models: list[str], chat: bool, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": rng.choice(models),
        "max_tokens": rng.randint(1, 12),
        "stream": stream,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body["temperature"] = round(rng.uniform(0.5, 1.2), 2)
        body["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.2:
        body["stop"] = rng.choice(["\n", ".", [",", "!"]])
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return body


def _invalid_request(rng: random.Random, models: list[str], max_len: int) -> tuple[str, Any, int]:
    """(path, body or raw bytes, expected status)."""
    m = rng.choice(models)
    cases: list[tuple[str, Any, int]] = [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", {"model": m, "prompt": "hi", "max_tokens": "ten"}, 400),
        ("/v1/completions", {"model": m, "prompt": "hi", "max_tokens": -4}, 400),
        ("/v1/completions", {"model": m, "prompt": "hi", "max_tokens": 10**9}, 400),
        ("/v1/completions", {"model": m, "prompt": list(range(1, max_len + 50))}, 400),
        ("/v1/completions", {"model": m, "prompt": ""}, 400),
        ("/v1/completions", {"model": m, "prompt": "hi", "n": 0}, 400),
        ("/v1/completions", {"model": m, "prompt": "hi", "guided_json": {}}, 400),
        ("/v1/chat/completions", {"model": m, "messages": []}, 400),
        ("/v1/chat/completions", {"model": m, "messages": [{"role": "user", "content": 5}]}, 400),
        (
            "/v1/chat/completions",
            {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
            404,
        ),
        ("/v1/completions", {"model": m, "prompt": "hi", "temperature": -2}, 400),
    ]
    return rng.choice(cases)


async def _read_stream(resp: httpx.Response, t0: float, stats: Stats, limit: int | None) -> str:
    """Read SSE events; stop after `limit` content events (a deliberate disconnect). Returns
    'done' ([DONE] after tokens), 'error' (an error event, then [DONE]), 'cut' (our limit) or
    'truncated' (the stream ended without [DONE])."""
    got = 0
    error = False
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return "error" if error else "done"
        event = json.loads(data)
        if "error" in event:
            error = True
            continue
        if event.get("choices"):
            c = event["choices"][0]
            piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
            if piece:
                if got == 0 and limit is None:
                    stats.ttft.append(time.perf_counter() - t0)
                got += 1
                if limit is not None and got >= limit:
                    return "cut"
    return "truncated"


def _clean_error(resp: httpx.Response) -> bool:
    """An OpenAI error body with the fields a client reads."""
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and {"message", "type", "code"} <= set(err)


async def client_loop(
    cid: int,
    url: str,
    headers: dict[str, str],
    models: list[str],
    max_len: int,
    deadline: float,
    stats: Stats,
    seed: int,
    faults: bool = False,
) -> None:
    rng = random.Random(seed * 1000 + cid)
    # With injected faults a valid request may end with a clean engine error (500/503 with an
    # error body, or an error event in its stream); without them that is unexpected.
    ok_valid: tuple[int | str, ...] = (200, 429)
    if faults:
        ok_valid += ("500-clean", "503-clean", "200-error-event")
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(300.0)) as h:
        while time.monotonic() < deadline:
            r = rng.random()
            t0 = time.perf_counter()
            try:
                if r < 0.30:  # valid, not streamed
                    chat = rng.random() < 0.5
                    path = "/v1/chat/completions" if chat else "/v1/completions"
                    resp = await h.post(path, json=_valid_body(rng, models, chat, False))
                    clean = _clean_error(resp)
                    stats.record("valid", resp.status_code if resp.status_code < 500 or not clean
                                 else f"{resp.status_code}-clean", ok_valid)
                    if resp.status_code == 200:
                        stats.latency.append(time.perf_counter() - t0)
                        stats.tokens += resp.json()["usage"]["completion_tokens"]
                        stats.ended["tokens"] += 1
                    elif resp.status_code != 429:
                        stats.ended["clean_error" if clean else "lost"] += 1
                elif r < 0.60:  # valid, streamed to the end
                    chat = rng.random() < 0.5
                    path = "/v1/chat/completions" if chat else "/v1/completions"
                    async with h.stream(
                        "POST", path, json=_valid_body(rng, models, chat, True)
                    ) as resp:
                        if resp.status_code == 200:
                            how = await _read_stream(resp, t0, stats, None)
                            status: int | str = {"done": 200, "error": "200-error-event"}.get(
                                how, "stream-truncated")
                        else:
                            await resp.aread()
                            status = resp.status_code
                            if status >= 500 and _clean_error(resp):
                                status = f"{status}-clean"
                    stats.record("valid-stream", status, ok_valid)
                    if status == 200:
                        stats.latency.append(time.perf_counter() - t0)
                        stats.ended["tokens"] += 1
                    elif status != 429:
                        clean = status == "200-error-event" or str(status).endswith("-clean")
                        stats.ended["clean_error" if clean else "lost"] += 1
                elif r < 0.80:  # invalid
                    path, body, expect = _invalid_request(rng, models, max_len)
                    if isinstance(body, bytes):
                        resp = await h.post(
                            path, content=body, headers={"content-type": "application/json"}
                        )
                    else:
                        resp = await h.post(path, json=body)
                    ok = resp.status_code in (expect, 429) and "error" in resp.json()
                    stats.record(
                        "invalid",
                        resp.status_code if ok else f"wrong-{resp.status_code}",
                        (expect, 429),
                    )
                elif r < 0.95:  # stream, then hang up after a few chunks
                    body = _valid_body(rng, models, rng.random() < 0.5, True)
                    body.update(max_tokens=200, ignore_eos=True)
                    body.pop("stop", None)
                    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                    async with h.stream("POST", path, json=body) as resp:
                        if resp.status_code == 200:
                            await _read_stream(resp, t0, stats, rng.randint(1, 3))
                        else:
                            await resp.aread()
                        status = resp.status_code  # leaving the block closes the connection
                        if status >= 500 and _clean_error(resp):
                            status = f"{status}-clean"
                    stats.record("disconnect-stream", status, ok_valid)
                else:  # unary request abandoned by a short read timeout
                    body = {
                        "model": rng.choice(models),
                        "prompt": rng.choice(PROMPTS),
                        "max_tokens": 200,
                        "ignore_eos": True,
                    }
                    try:
                        resp = await h.post(
                            "/v1/completions",
                            json=body,
                            timeout=httpx.Timeout(300.0, read=rng.uniform(0.2, 1.0)),
                        )
                        clean = resp.status_code >= 500 and _clean_error(resp)
                        stats.record(
                            "disconnect-unary",
                            f"completed-{resp.status_code}{'-clean' if clean else ''}",
                            ("completed-200", "completed-429", *(
                                f"completed-{c}-clean" for c in (500, 503) if faults)),
                        )
                    except httpx.ReadTimeout:
                        stats.record("disconnect-unary", "client-timeout", ("client-timeout",))
            except (httpx.HTTPError, RuntimeError, json.JSONDecodeError) as e:
                stats.record("transport", f"{type(e).__name__}", ())
                if r < 0.60:
                    stats.ended["lost"] += 1


# ---- head-of-line probe --------------------------------------------------------------------------
async def hol_probe(
    url: str, headers: dict[str, str], models: list[str], prompt_bytes: int = 10_000_000
) -> dict[str, Any]:
    """One model streams 200 tokens; after its 20th chunk a prompt of `prompt_bytes` characters
    goes to another model (refused on its length alone), after its 100th a prompt just under the
    character limit (tokenised off the engine thread, then refused for its token count). The
    stream's gaps between chunks: P50 against the largest."""
    streamed, big_model = models[-1], models[0]
    body = {"model": streamed, "prompt": "Count slowly:", "max_tokens": 200, "ignore_eos": True,
            "temperature": 0, "stream": True, "logprobs": 0}
    times: list[float] = []
    big: dict[str, Any] = {}
    tokenised: dict[str, Any] = {}

    async def send(h: httpx.AsyncClient, size: int, into: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        r = await h.post("/v1/completions", json={"model": big_model,
                                                  "prompt": "hello " * (size // 6),
                                                  "max_tokens": 1})
        into.update(status=r.status_code, seconds=round(time.perf_counter() - t0, 3),
                    error=(r.json().get("error") or {}).get("message", "")[:160])

    listing = (await httpx.AsyncClient(base_url=url, headers=headers).get("/v1/models")).json()
    window = {m["id"]: m["max_model_len"] for m in listing["data"]}[big_model]
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as h:
        tasks = []
        async with h.stream("POST", "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                times.append(time.perf_counter())
                if len(times) == 20:
                    tasks.append(asyncio.ensure_future(send(h, prompt_bytes, big)))
                if len(times) == 100:  # ~6 characters a token: a few times the window
                    tasks.append(asyncio.ensure_future(send(h, window * 24, tokenised)))
        await asyncio.gather(*tasks)
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    p50 = _percentile(gaps, 0.5) or 0.0
    worst = max(gaps) if gaps else 0.0
    return {
        "streamed_model": streamed,
        "big_prompt_model": big_model,
        "big_prompt_bytes": prompt_bytes,
        "big_prompt_response": big,
        "tokenised_prompt_response": tokenised,
        "stream_chunks": len(times),
        "gap_p50_s": round(p50, 4),
        "gap_max_s": round(worst, 4),
        "max_over_p50": round(worst / p50, 2) if p50 else None,
        "ok": bool(p50) and worst <= 3 * p50 and big.get("status") == 400,
    }


# ---- accounting ----------------------------------------------------------------------------------
def memory(url: str, headers: dict[str, str]) -> dict[str, Any]:
    r = httpx.get(url + "/v1/memory", params={"check": "true"}, headers=headers, timeout=120)
    r.raise_for_status()
    return r.json()


def settle(url: str, headers: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        m = memory(url, headers)
        idle = all(x["running"] == 0 and x["waiting"] == 0 for x in m["models"].values())
        if (idle and m["kv_blocks_used"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.25)


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    def weights(m: dict[str, Any]) -> dict[str, int]:
        return {
            k: v for k, v in m["pages_by_owner"].items() if not k.endswith("/kv") and k != "free"
        }

    def free_plus_kv(m: dict[str, Any]) -> int:
        return m["pages_by_owner"].get("free", 0) + sum(
            v for k, v in m["pages_by_owner"].items() if k.endswith("/kv")
        )

    checks = {
        "kv_blocks_used_zero_before_and_after": before["kv_blocks_used"]
        == after["kv_blocks_used"]
        == 0,
        "weight_pages_unchanged": weights(before) == weights(after),
        "free_plus_kv_pages_unchanged": free_plus_kv(before) == free_plus_kv(after),
        "every_page_owned_once": all(
            sum(m["pages_by_owner"].values()) == m["num_pages"] for m in (before, after)
        ),
        "kv_pool_pages_match_arena": all(
            m["pages_by_owner"].get(f"{name}/kv", 0) == info["kv_pages"]
            for m in (before, after)
            for name, info in m["models"].items()
        ),
        "engine_integrity_ok": before.get("integrity") == after.get("integrity") == "ok",
        "nothing_running_or_waiting": all(
            x["running"] == 0 and x["waiting"] == 0 for x in after["models"].values()
        ),
    }
    return {"ok": all(checks.values()), **checks}


def scrape(url: str, headers: dict[str, str]) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=headers, timeout=60).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(
            (
                "oneiros_injected_faults_total",
                "oneiros_preemptions_total",
                "oneiros_engine_step_errors_total",
                "oneiros_requests_finished_total",
                "oneiros_generation_tokens_total",
            )
        ):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def run_clients(
    args: argparse.Namespace, url: str, headers: dict[str, str], models: list[str], max_len: int
) -> tuple[Stats, float]:
    stats = Stats()
    t0 = time.monotonic()
    deadline = t0 + args.duration
    await asyncio.gather(
        *(
            client_loop(i, url, headers, models, max_len, deadline, stats, args.seed,
                        bool(args.faults))
            for i in range(args.clients)
        )
    )
    return stats, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--url", help="target this running server (loopback only) instead of starting one"
    )
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    p.add_argument("--out", default="soak.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hol-probe", action="store_true",
                   help="first, a 10 MB prompt to one model while another streams")
    p.add_argument("--hol-only", action="store_true", help="the probe alone, no load")
    g = p.add_argument_group("server started by the soak (without --url)")
    g.add_argument("--faults", default=None,
                   help="inject faults into the server (ONEIROS_FAULTS spec), e.g. "
                   "copy:0.01,restore:0.01,step:0.01,slow:0.05@0.2")
    g.add_argument("--models", default="a=smollm2,b=smollm2", help="name=source,...")
    g.add_argument("--memory-budget", default="1500MiB")
    g.add_argument("--max-model-len", type=int, default=1024)
    g.add_argument("--max-queue", type=int, default=64)
    g.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the server")
    g.add_argument("--server-log", default=None)
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64:
        p.error("--clients must be between 1 and 64")
    if not 0 < args.duration <= 3600:
        p.error("--duration must be in (0, 3600] seconds")

    server = None
    if args.url:
        if not _is_loopback(args.url):
            p.error("--url must point at a loopback address (127.0.0.1, ::1, localhost)")
        url = args.url.rstrip("/")
    else:
        server = LocalServer(args)
        url = server.url
        print(f"starting server on {url} (log: {server.log_path})", flush=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    report: dict[str, Any] = {
        "url": url,
        "clients": args.clients,
        "duration_s": args.duration,
        "seed": args.seed,
    }
    rc = 1
    try:
        if server is not None:
            t = time.monotonic()
            server.wait_ready(600)
            report["server_startup_s"] = round(time.monotonic() - t, 1)
        listing = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"]
        models = [m["id"] for m in listing]
        max_len = min(m.get("max_model_len", 2048) for m in listing)
        before = settle(url, headers)
        if args.hol_probe or args.hol_only:
            report["hol_probe"] = asyncio.run(hol_probe(url, headers, models))
            print("head-of-line probe:", json.dumps(report["hol_probe"]), flush=True)
        if args.hol_only:
            args.duration = 0.0
        print(f"models {models}; load: {args.clients} clients for {args.duration:.0f}s", flush=True)
        stats, elapsed = asyncio.run(run_clients(args, url, headers, models, max_len))
        after = settle(url, headers)
        served = sum(n for k, n in stats.by_kind_status.items() if k.endswith(":200"))
        report.update(
            {
                "elapsed_s": round(elapsed, 1),
                "requests_total": sum(stats.by_kind.values()),
                "requests_served_200": served,
                "valid_completed": len(stats.latency),
                "completion_tokens_non_streamed": stats.tokens,
                "requests_by_kind": dict(stats.by_kind),
                "responses_by_status": dict(stats.by_status),
                "by_kind_and_status": dict(sorted(stats.by_kind_status.items())),
                "latency_s": {
                    "p50": _percentile(stats.latency, 0.5),
                    "p99": _percentile(stats.latency, 0.99),
                    "max": _percentile(stats.latency, 1.0),
                },
                "stream_ttft_s": {
                    "p50": _percentile(stats.ttft, 0.5),
                    "p99": _percentile(stats.ttft, 0.99),
                },
                "unexpected": stats.unexpected,
                "valid_requests_ended": {
                    "with_tokens": stats.ended["tokens"],
                    "with_clean_error": stats.ended["clean_error"],
                    "lost": stats.ended["lost"],
                },
                "faults": args.faults,
                "memory_before": before,
                "memory_after": after,
                "accounting": compare(before, after),
                "metrics_after": scrape(url, headers),
            }
        )
        rc = 0 if report["accounting"]["ok"] and not stats.unexpected else 1
        if stats.ended["lost"] or not report.get("hol_probe", {"ok": True})["ok"]:
            rc = 1
    finally:
        if server is not None:
            report["server_shutdown"] = server.stop()
            if report["server_shutdown"]["exit_code"] != 0:
                rc = 1
        report["ok"] = rc == 0
        Path(args.out).write_text(json.dumps(report, indent=2))
    summary = {
        k: report.get(k)
        for k in (
            "requests_total",
            "requests_served_200",
            "responses_by_status",
            "latency_s",
            "stream_ttft_s",
            "unexpected",
            "valid_requests_ended",
            "hol_probe",
            "ok",
        )
    }
    summary["accounting"] = report.get("accounting")
    summary["server_shutdown"] = report.get("server_shutdown")
    print(json.dumps(summary, indent=2))
    print(f"report written to {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
