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


def merge_snapshots(replicas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A cluster's snapshot: every replica's own under `replicas` (an `error` for one that did not
    answer), and the single-engine fields summed over the replicas that did (a model held by
    several replicas: its numbers summed, its other fields from the first)."""
    ok = [r for r in replicas.values() if "models" in r]
    models: dict[str, dict[str, Any]] = {}
    for r in ok:
        for name, m in r["models"].items():
            if name not in models:
                models[name] = {**m, "counters": dict(m.get("counters", {}))}
                continue
            into = models[name]
            for k, v in m.items():
                if k in ("num_layers", "max_model_len", "block_size", "kv_blocks_per_page"):
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    into[k] = into.get(k, 0) + v
            for k, v in m.get("counters", {}).items():
                if isinstance(v, (int, float)):
                    into["counters"][k] = into["counters"].get(k, 0) + v
    owners: dict[str, int] = {}
    for r in ok:
        for owner, n in r["pages_by_owner"].items():
            owners[owner] = owners.get(owner, 0) + n
    total = {k: sum(r.get(k, 0) for r in ok) for k in (
        "num_pages", "free_pages", "kv_blocks_used", "kv_blocks_free", "kv_blocks_cached",
        "kv_pages", "kv_pages_empty")}
    return {
        "page_bytes": max((r["page_bytes"] for r in ok), default=0),
        **total,
        "pages_by_owner": dict(sorted(owners.items())),
        "models": models,
        "replicas": replicas,
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
        yield from _engine_families(*_parts(s))


def _parts(s: dict[str, Any]) -> tuple[list[str], list[tuple[list[str], dict[str, Any]]]]:
    """(extra label names, [(their values, snapshot)]): one engine's snapshot, or one per replica
    of a cluster's (under the label `replica`)."""
    if "replicas" not in s:
        return [], [([], s)]
    return ["replica"], [([name], r) for name, r in s["replicas"].items() if "models" in r]


def _engine_families(
    extra: list[str], parts: list[tuple[list[str], dict[str, Any]]]
) -> Iterator[Metric]:
    """The engine families over every (labels, snapshot) part: per model, per replica when a
    cluster's."""

    def family(cls: Any, name: str, doc: str, label: str = "model") -> Any:
        return cls(name, doc, labels=[label, *extra])

    def per_model(cls: Any, name: str, doc: str, value: Any, label: str = "model") -> Metric:
        fam = family(cls, name, doc, label)
        for lab, snap in parts:
            for model, m in snap["models"].items():
                fam.add_metric([model, *lab], value(m))
        return fam

    per_model_keys = [
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
    for name, doc, key, counter in per_model_keys:
        cls = CounterMetricFamily if counter else GaugeMetricFamily
        yield per_model(cls, name, doc, lambda m, key=key: m[key])
    yield per_model(GaugeMetricFamily, "oneiros_layers_nonresident",
                    "Decoder layers remapped away (streamed from host when the model runs)",
                    lambda m: m["num_layers"] - m["layers_resident"])
    yield per_model(GaugeMetricFamily, "oneiros_kv_cache_usage",
                    "KV blocks in use / blocks the model could hold (1 = full)", _kv_usage)
    kinds = CounterMetricFamily("oneiros_preemptions_by_kind",
                                "Requests preempted, by preemption kind",
                                labels=["model", "kind", *extra])
    for lab, snap in parts:
        for n, m in snap["models"].items():
            kinds.add_metric([n, m.get("preemption_mode", "recompute"), *lab], m["preemptions"])
    yield kinds
    swap = family(GaugeMetricFamily, "oneiros_swap_blocks_used",
                  "Host KV blocks holding swapped-out requests")
    any_swap = False
    for lab, snap in parts:
        for n, m in snap["models"].items():
            if "swap_blocks_used" in m:
                swap.add_metric([n, *lab], m["swap_blocks_used"])
                any_swap = True
    if any_swap:
        yield swap
    fields: dict[str, None] = {}
    for _, snap in parts:
        for m in snap["models"].values():
            fields.update(dict.fromkeys(m.get("counters", {})))
    for f in fields:
        name, doc = _counter_name(f)
        fam = family(CounterMetricFamily, name, doc)
        for lab, snap in parts:
            for model, m in snap["models"].items():
                if f in m.get("counters", {}):
                    fam.add_metric([model, *lab], m["counters"][f])
        yield fam
    pages = GaugeMetricFamily(
        "oneiros_arena_pages", "Arena pages by owner (model/kind, or free)",
        labels=["owner", *extra],
    )
    for lab, snap in parts:
        for owner, n in snap["pages_by_owner"].items():
            pages.add_metric([owner, *lab], n)
    yield pages
    # vLLM's names, with its label.
    for name, doc, value in (
        ("vllm:num_requests_running", "Requests running in the engine", lambda m: m["running"]),
        ("vllm:num_requests_waiting", "Requests waiting in the engine", lambda m: m["waiting"]),
        ("vllm:kv_cache_usage_perc", "KV-cache usage (1 means 100 percent)", _kv_usage),
        ("vllm:gpu_cache_usage_perc", "KV-cache usage (1 means 100 percent); old name",
         _kv_usage),
    ):
        yield per_model(GaugeMetricFamily, name, doc, value, "model_name")
    yield per_model(CounterMetricFamily, "vllm:num_preemptions", "Requests preempted",
                    lambda m: m["preemptions"], "model_name")
    for field, name, doc in (
        ("prefix_cache_queries", "vllm:prefix_cache_queries",
         "Prompt tokens looked up in the prefix cache"),
        ("prefix_cache_hits", "vllm:prefix_cache_hits",
         "Prompt tokens found in the prefix cache (prefill skipped)"),
    ):
        yield per_model(CounterMetricFamily, name, doc,
                        lambda m, field=field: m.get("counters", {}).get(field, 0), "model_name")
    if extra:
        up = GaugeMetricFamily("oneiros_replica_up",
                               "1 when the replica answered the last scrape", labels=extra)
        for lab, _ in parts:
            up.add_metric(lab, 1)
        yield up


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
