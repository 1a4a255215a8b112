"""Prometheus metrics, one registry per app.

Request-level metrics (TTFT, TBT, tokens, finished requests, HTTP responses) are recorded as requests
run. Engine-level ones (running/waiting requests, preemptions, pages by owner, KV blocks, resident
layers) are read from a snapshot taken on the engine thread when /metrics is scraped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from oneiros.core import RequestOutput
from oneiros.engine.engine import LLMEngine

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TBT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def memory_snapshot(engine: LLMEngine) -> dict[str, Any]:
    """Pages by owner, per-model resident layers, KV blocks and queue lengths. Engine thread only."""
    arena = engine.arena
    models: dict[str, Any] = {}
    for name, t in engine.tenants.items():
        slabs = t.residency.slab_pages
        m: dict[str, Any] = {
            "num_layers": len(slabs),
            "layers_resident": sum(p is not None for p in slabs),
            "kv_blocks_used": t.pool.num_used,
            "kv_blocks_free": t.pool.num_free_blocks,
            "kv_blocks_cached": t.pool.num_cached,
            "kv_pages": t.pool.num_pages,
            "kv_blocks_per_page": t.pool.blocks_per_page,
            "kv_block_capacity": t.scheduler.max_blocks(),
            "block_size": t.pool.block_size,
            "max_model_len": t.max_model_len,
            "running": len(t.scheduler.running),
            "waiting": len(t.scheduler.waiting),
            "preemptions": t.state.counters.preemptions,
        }
        host = getattr(t.scheduler, "host_pool", None)  # swap policy only
        if host is not None:
            m["swap_blocks_used"] = host.num_blocks - host.num_free
            m["swap_blocks_total"] = host.num_blocks
        counters = getattr(getattr(t, "state", None), "counters", None)
        if counters is not None and dataclasses.is_dataclass(counters):
            m["counters"] = dataclasses.asdict(counters)
        models[name] = m
    return {
        "page_bytes": arena.page_bytes,
        "num_pages": arena.num_pages,
        "free_pages": arena.num_free,
        "pages_by_owner": dict(sorted(arena.usage_by_kind().items())),
        "kv_blocks_used": sum(m["kv_blocks_used"] for m in models.values()),
        "kv_blocks_free": sum(m["kv_blocks_free"] for m in models.values()),
        "kv_pages": sum(m["kv_pages"] for m in models.values()),
        "models": models,
    }


# Engine counters (TenantCounters fields) exported as Prometheus counters, when the engine has them.
_ENGINE_COUNTERS = {
    "steps": ("oneiros_engine_steps", "Engine steps the model ran in"),
    "prefill_tokens": ("oneiros_prefill_tokens_computed", "Prompt (prefill) tokens computed"),
    "decode_tokens": ("oneiros_decode_tokens_computed", "Decode tokens computed"),
    "recomputed_tokens": ("oneiros_recomputed_tokens", "Tokens recomputed after preemption"),
    "swap_out_bytes": ("oneiros_swap_out_bytes", "KV bytes swapped out to host memory"),
    "swap_in_bytes": ("oneiros_swap_in_bytes", "KV bytes swapped in from host memory"),
}


class _EngineCollector(Collector):
    """Engine gauges from the latest snapshot (refreshed by the /metrics handler before rendering)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] | None = None
        self.step_errors = 0
        self.in_flight = 0

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        yield GaugeMetricFamily(
            "oneiros_server_requests_in_flight",
            "Requests admitted by the HTTP server and not yet answered",
            value=self.in_flight,
        )
        yield CounterMetricFamily(
            "oneiros_engine_step_errors", "Engine steps that raised", value=self.step_errors
        )
        if s is None:
            return
        per_model = [
            (
                "oneiros_requests_running",
                "Requests running in the engine",
                "running",
                GaugeMetricFamily,
            ),
            (
                "oneiros_requests_waiting",
                "Requests waiting in the engine",
                "waiting",
                GaugeMetricFamily,
            ),
            (
                "oneiros_preemptions",
                "Requests preempted (recompute)",
                "preemptions",
                CounterMetricFamily,
            ),
            (
                "oneiros_kv_blocks_used",
                "KV cache blocks in use",
                "kv_blocks_used",
                GaugeMetricFamily,
            ),
            (
                "oneiros_kv_blocks_free",
                "Free KV blocks in pages the pool owns",
                "kv_blocks_free",
                GaugeMetricFamily,
            ),
            (
                "oneiros_kv_pages",
                "Arena pages owned by the model's KV pool",
                "kv_pages",
                GaugeMetricFamily,
            ),
            (
                "oneiros_layers_resident",
                "Decoder layers whose parameters are in the arena",
                "layers_resident",
                GaugeMetricFamily,
            ),
        ]
        for name, doc, key, cls in per_model:
            fam = cls(name, doc, labels=["model"])
            for model, m in s["models"].items():
                fam.add_metric([model], m[key])
            yield fam
        swap = [(n, m) for n, m in s["models"].items() if "swap_blocks_used" in m]
        if swap:
            fam = GaugeMetricFamily(
                "oneiros_swap_blocks_used",
                "Host KV blocks holding swapped-out requests",
                labels=["model"],
            )
            for model, m in swap:
                fam.add_metric([model], m["swap_blocks_used"])
            yield fam
        for key, (name, doc) in _ENGINE_COUNTERS.items():
            have = [
                (n, m["counters"][key])
                for n, m in s["models"].items()
                if key in m.get("counters", {})
            ]
            if have:
                fam = CounterMetricFamily(name, doc, labels=["model"])
                for model, v in have:
                    fam.add_metric([model], v)
                yield fam
        pages = GaugeMetricFamily(
            "oneiros_arena_pages", "Arena pages by owner (model/kind, or free)", labels=["owner"]
        )
        for owner, n in s["pages_by_owner"].items():
            pages.add_metric([owner], n)
        yield pages


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ttft = Histogram(
            "oneiros_time_to_first_token_seconds",
            "From request arrival at the server to its first generated token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tbt = Histogram(
            "oneiros_time_between_tokens_seconds",
            "Gap between consecutive generated tokens of a request",
            ["model"],
            buckets=TBT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "oneiros_request_latency_seconds",
            "From request arrival at the server to its last token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "oneiros_prompt_tokens", "Prompt tokens of finished requests", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "oneiros_generation_tokens",
            "Generated tokens of finished requests",
            ["model"],
            registry=r,
        )
        self.finished = Counter(
            "oneiros_requests_finished",
            "Requests finished by the engine",
            ["model", "finish_reason"],
            registry=r,
        )
        self.http = Counter(
            "oneiros_http_responses",
            "HTTP responses by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.engine = _EngineCollector()
        r.register(self.engine)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Feeds one request's outputs (possibly coalesced) into the TTFT/TBT histograms."""

    def __init__(self, metrics: ServerMetrics, model: str, submit_time: float) -> None:
        self.m = metrics
        self.model = model
        self.submit_time = submit_time
        self.seen = 0

    def observe(self, out: RequestOutput) -> None:
        times = out.token_times
        if self.seen == 0 and times:
            self.m.ttft.labels(self.model).observe(max(0.0, times[0] - self.submit_time))
        start = max(self.seen, 1)
        if len(times) > start:
            h = self.m.tbt.labels(self.model)
            for a, b in zip(times[start - 1 :], times[start:]):
                h.observe(b - a)
        self.seen = max(self.seen, len(times))
        if out.finished:
            self.m.finished.labels(self.model, out.finish_reason or "unknown").inc()
            self.m.prompt_tokens.labels(self.model).inc(len(out.prompt_token_ids))
            self.m.generation_tokens.labels(self.model).inc(len(out.token_ids))
            if times:
                self.m.e2e.labels(self.model).observe(max(0.0, times[-1] - self.submit_time))
