"""Prometheus metrics (one registry per app) and the engine snapshot behind /v1/memory.

Request-level metrics (TTFT, inter-token latency, end-to-end latency, tokens, finished requests,
HTTP responses) are recorded as requests run, each under our name with a `model` label and under
vLLM's name with a `model_name` label, so dashboards built for vLLM work unchanged. Engine-level
ones are read from a snapshot taken on the engine thread when /metrics is scraped: running and
waiting requests, KV-cache usage, pages by owner, layers resident and non-resident, and every
per-model engine counter (`TenantCounters`: remap and restore events, host-to-device bytes, exposed
copy seconds, preemptions, ...), exported by iterating its fields so new counters appear by
themselves.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from oneiros.core import RequestOutput

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TBT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WINDOW_S = 60.0  # the dashboard's latency percentiles cover this much recent time


def memory_snapshot(engine: Any) -> dict[str, Any]:
    """Pages by owner, per-model resident layers, KV blocks, queue lengths and engine counters.
    Engine thread only."""
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
            "kv_pages_empty": t.pool.num_empty_pages,
            "kv_blocks_per_page": t.pool.blocks_per_page,
            "kv_block_capacity": t.scheduler.max_blocks(),
            "block_size": t.pool.block_size,
            "max_model_len": t.max_model_len,
            "running": len(t.scheduler.running),
            "waiting": len(t.scheduler.waiting),
            "preemptions": t.state.counters.preemptions,
            "preemption_mode": getattr(t.scheduler, "preemption", "recompute"),
        }
        host = getattr(t.scheduler, "host_pool", None)  # swap policy only
        if host is not None:
            m["swap_blocks_used"] = host.num_blocks - host.num_free
            m["swap_blocks_total"] = host.num_blocks
        counters = engine.store.states[name].counters
        if dataclasses.is_dataclass(counters):
            m["counters"] = dataclasses.asdict(counters)
        models[name] = m
    return {
        "page_bytes": arena.page_bytes,
        "num_pages": arena.num_pages,
        "free_pages": arena.num_free,
        "pages_by_owner": dict(sorted(arena.usage_by_kind().items())),
        "kv_blocks_used": sum(m["kv_blocks_used"] for m in models.values()),
        "kv_blocks_free": sum(m["kv_blocks_free"] for m in models.values()),
        "kv_blocks_cached": sum(m["kv_blocks_cached"] for m in models.values()),
        "kv_pages": sum(m["kv_pages"] for m in models.values()),
        "kv_pages_empty": sum(m["kv_pages_empty"] for m in models.values()),
        "models": models,
    }


# Our established names for some engine counters; every other TenantCounters field is exported as
# oneiros_engine_<field>_total.
_COUNTER_NAMES = {
    "steps": ("oneiros_engine_steps", "Engine steps the model ran in"),
    "prefill_tokens": ("oneiros_prefill_tokens_computed", "Prompt (prefill) tokens computed"),
    "decode_tokens": ("oneiros_decode_tokens_computed", "Decode tokens computed"),
    "recomputed_tokens": ("oneiros_recomputed_tokens", "Tokens recomputed after preemption"),
    "swap_out_bytes": ("oneiros_swap_out_bytes", "KV bytes swapped out to host memory"),
    "swap_in_bytes": ("oneiros_swap_in_bytes", "KV bytes swapped in from host memory"),
    "remapped_layers": ("oneiros_remap_events",
                        "Layer slabs remapped into KV cache (parameter remapping)"),
    "restored_layers": ("oneiros_restore_events",
                        "Remapped layers restored to a slab of their own"),
    "h2d_bytes": ("oneiros_h2d_bytes", "Host-to-device bytes copied: streamed layers and restores"),
    "stream_exposed_s": ("oneiros_copy_exposed_seconds",
                         "Seconds the compute waited for layer copies"),
    "stream_copy_s": ("oneiros_copy_seconds", "Seconds spent copying streamed layers"),
}


def _counter_name(field: str) -> tuple[str, str]:
    return _COUNTER_NAMES.get(
        field, (f"oneiros_engine_{field}", f"Engine counter {field} (TenantCounters)")
    )


class _EngineCollector(Collector):
    """Engine gauges and counters from the latest snapshot (refreshed by /metrics)."""

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
        from oneiros.engine import faults

        plan = faults.active()
        if plan is not None:
            fired = CounterMetricFamily("oneiros_injected_faults", "Faults injected (drills)",
                                        labels=["kind"])
            for kind in plan.faults:
                fired.add_metric([kind], plan.fired[kind])
            yield fired
        if s is None:
            return
        models = s["models"]
        per_model = [
            ("oneiros_requests_running", "Requests running in the engine", "running", False),
            ("oneiros_requests_waiting", "Requests waiting in the engine", "waiting", False),
            ("oneiros_preemptions", "Requests preempted", "preemptions", True),
            ("oneiros_kv_blocks_used", "KV cache blocks in use", "kv_blocks_used", False),
            ("oneiros_kv_blocks_free", "Free KV blocks in pages the pool owns",
             "kv_blocks_free", False),
            ("oneiros_kv_blocks_cached", "KV blocks no request holds, kept for prefix cache "
             "hits (the first memory given away)", "kv_blocks_cached", False),
            ("oneiros_kv_pages", "Arena pages owned by the model's KV pool", "kv_pages", False),
            ("oneiros_layers_resident", "Decoder layers whose parameters are in the arena",
             "layers_resident", False),
        ]
        for name, doc, key, counter in per_model:
            fam = (CounterMetricFamily if counter else GaugeMetricFamily)(
                name, doc, labels=["model"]
            )
            for model, m in models.items():
                fam.add_metric([model], m[key])
            yield fam
        yield self._gauge("oneiros_layers_nonresident",
                          "Decoder layers remapped away (streamed from host when the model runs)",
                          {n: m["num_layers"] - m["layers_resident"] for n, m in models.items()})
        usage = {n: _kv_usage(m) for n, m in models.items()}
        yield self._gauge("oneiros_kv_cache_usage", "KV blocks in use / blocks the model could "
                          "hold (1 = full)", usage)
        kinds = CounterMetricFamily("oneiros_preemptions_by_kind",
                                    "Requests preempted, by preemption kind",
                                    labels=["model", "kind"])
        for n, m in models.items():
            kinds.add_metric([n, m.get("preemption_mode", "recompute")], m["preemptions"])
        yield kinds
        swap = {n: m["swap_blocks_used"] for n, m in models.items() if "swap_blocks_used" in m}
        if swap:
            yield self._gauge("oneiros_swap_blocks_used",
                              "Host KV blocks holding swapped-out requests", swap)
        fields: dict[str, None] = {}
        for m in models.values():
            fields.update(dict.fromkeys(m.get("counters", {})))
        for f in fields:
            name, doc = _counter_name(f)
            fam = CounterMetricFamily(name, doc, labels=["model"])
            for model, m in models.items():
                if f in m.get("counters", {}):
                    fam.add_metric([model], m["counters"][f])
            yield fam
        pages = GaugeMetricFamily(
            "oneiros_arena_pages", "Arena pages by owner (model/kind, or free)", labels=["owner"]
        )
        for owner, n in s["pages_by_owner"].items():
            pages.add_metric([owner], n)
        yield pages
        # vLLM's names, with its label.
        for name, doc, values in (
            ("vllm:num_requests_running", "Requests running in the engine",
             {n: m["running"] for n, m in models.items()}),
            ("vllm:num_requests_waiting", "Requests waiting in the engine",
             {n: m["waiting"] for n, m in models.items()}),
            ("vllm:kv_cache_usage_perc", "KV-cache usage (1 means 100 percent)", usage),
            ("vllm:gpu_cache_usage_perc", "KV-cache usage (1 means 100 percent); old name", usage),
        ):
            yield self._gauge(name, doc, values, "model_name")
        pre = CounterMetricFamily("vllm:num_preemptions", "Requests preempted",
                                  labels=["model_name"])
        for n, m in models.items():
            pre.add_metric([n], m["preemptions"])
        yield pre
        for field, name, doc in (
            ("prefix_cache_queries", "vllm:prefix_cache_queries",
             "Prompt tokens looked up in the prefix cache"),
            ("prefix_cache_hits", "vllm:prefix_cache_hits",
             "Prompt tokens found in the prefix cache (prefill skipped)"),
        ):
            fam = CounterMetricFamily(name, doc, labels=["model_name"])
            for n, m in models.items():
                fam.add_metric([n], m.get("counters", {}).get(field, 0))
            yield fam

    @staticmethod
    def _gauge(name: str, doc: str, values: dict[str, float], label: str = "model") -> Metric:
        fam = GaugeMetricFamily(name, doc, labels=[label])
        for model, v in values.items():
            fam.add_metric([model], v)
        return fam


def _kv_usage(m: dict[str, Any]) -> float:
    cap = m.get("kv_block_capacity") or 0
    return m["kv_blocks_used"] / cap if cap else 0.0


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry

        def both(cls: Any, ours: str, vllm: str, doc: str, labels: list[str], **kw: Any) -> tuple:
            return (
                cls(ours, doc, ["model", *labels], registry=r, **kw),
                cls(vllm, doc, ["model_name", *labels], registry=r, **kw),
            )

        self.ttft = both(Histogram, "oneiros_time_to_first_token_seconds",
                         "vllm:time_to_first_token_seconds",
                         "From request arrival at the server to its first generated token", [],
                         buckets=TTFT_BUCKETS)
        self.tbt = both(Histogram, "oneiros_time_between_tokens_seconds",
                        "vllm:inter_token_latency_seconds",
                        "Gap between consecutive generated tokens of a request", [],
                        buckets=TBT_BUCKETS)
        self.e2e = both(Histogram, "oneiros_request_latency_seconds",
                        "vllm:e2e_request_latency_seconds",
                        "From request arrival at the server to its last token", [],
                        buckets=TTFT_BUCKETS)
        self.prompt_tokens = both(Counter, "oneiros_prompt_tokens", "vllm:prompt_tokens",
                                  "Prompt tokens of finished requests", [])
        self.generation_tokens = both(Counter, "oneiros_generation_tokens",
                                      "vllm:generation_tokens",
                                      "Generated tokens of finished requests", [])
        self.finished = both(Counter, "oneiros_requests_finished", "vllm:request_success",
                             "Requests finished by the engine", ["finished_reason"])
        self.http = Counter(
            "oneiros_http_responses",
            "HTTP responses by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.engine = _EngineCollector()
        r.register(self.engine)
        # Recent (time, seconds) observations per model, for the dashboard's live percentiles.
        self.recent_ttft: dict[str, deque[tuple[float, float]]] = {}
        self.recent_tbt: dict[str, deque[tuple[float, float]]] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def remember(self, which: dict[str, deque], model: str, values: list[float]) -> None:
        d = which.get(model)
        if d is None:
            d = which[model] = deque(maxlen=20_000)
        now = time.monotonic()
        d.extend((now, v) for v in values)

    def recent(self, which: dict[str, deque], model: str) -> list[float]:
        d = which.get(model)
        if not d:
            return []
        cutoff = time.monotonic() - WINDOW_S
        while d and d[0][0] < cutoff:
            d.popleft()
        return [v for _, v in d]


class RequestTracker:
    """Feeds one request's outputs (possibly coalesced) into the latency histograms."""

    def __init__(self, metrics: ServerMetrics, model: str, submit_time: float) -> None:
        self.m = metrics
        self.model = model
        self.submit_time = submit_time
        self.seen = 0

    def observe(self, out: RequestOutput) -> None:
        m, model = self.m, self.model
        times = out.token_times
        if self.seen == 0 and times:
            ttft = max(0.0, times[0] - self.submit_time)
            for h in m.ttft:
                h.labels(model).observe(ttft)
            m.remember(m.recent_ttft, model, [ttft])
        start = max(self.seen, 1)
        if len(times) > start:
            gaps = [b - a for a, b in zip(times[start - 1 :], times[start:], strict=False)]
            for h in m.tbt:
                child = h.labels(model)
                for g in gaps:
                    child.observe(g)
            m.remember(m.recent_tbt, model, gaps)
        self.seen = max(self.seen, len(times))
        if out.finished:
            reason = out.finish_reason or "unknown"
            for c in m.finished:
                c.labels(model, reason).inc()
            for c in m.prompt_tokens:
                c.labels(model).inc(len(out.prompt_token_ids))
            for c in m.generation_tokens:
                c.labels(model).inc(len(out.token_ids))
            if times:
                for h in m.e2e:
                    h.labels(model).observe(max(0.0, times[-1] - self.submit_time))
