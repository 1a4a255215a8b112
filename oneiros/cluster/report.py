"""The placement and memory plan as text (`oneiros serve --cluster ... --dry-run`)."""

from __future__ import annotations

from oneiros.cluster.config import ClusterConfig
from oneiros.cluster.placement import ModelDemand, Placement
from oneiros.cluster.predict import Prediction

MiB = 1 << 20


def _mib(b: float) -> str:
    return f"{b / MiB:,.1f} MiB"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} ms"


def plan_text(
    cluster: ClusterConfig,
    placement: Placement,
    demands: list[ModelDemand],
    predictions: dict[str, Prediction] | None = None,
) -> str:
    by_name = {d.name: d for d in demands}
    sources = {m.name: m.source for m in cluster.models}
    per = "1 GPU" if cluster.device.startswith("cuda") else f"{cluster.replica_cpus:g} CPU"
    rate = (f"{cluster.rate_per_replica:g} req/s per model copy" if cluster.rate_per_replica
            else "no rate target")
    lines = [
        f"cluster: {len(placement.replicas)} replica(s) on {cluster.device} ({per} each), "
        f"{len(demands)} model(s); KV headroom {cluster.kv_headroom:g} x weights unless set; "
        f"{rate}; queue per replica {cluster.max_ongoing_requests} running + "
        f"{cluster.max_queued_requests} waiting (then 429)",
    ]
    for r in placement.replicas:
        lines.append(
            f"{r.name}: arena {_mib(r.memory_bytes)} = weights {_mib(r.weight_bytes)} + KV "
            f"reserved {_mib(r.kv_bytes)} + spare {_mib(r.free_bytes)} (KV may use "
            f"{_mib(r.memory_bytes - r.weight_bytes)}); expected {r.rate:g} req/s"
        )
        if not r.models:
            lines.append("  (no models: not started)")
        for name in r.models:
            d = by_name[name]
            copies = placement.copies[name]
            lines.append(
                f"  {name:<16} {sources[name]:<28} weights {_mib(d.weight_bytes):>11}  KV "
                f"{_mib(d.kv_bytes):>11}  copies {copies}"
                + (f"  {d.rate / copies:g} req/s here" if d.rate else "")
                + (f"  pinned {','.join(d.pins)}" if d.pins else "")
            )
        p = (predictions or {}).get(r.name)
        if p is not None:
            lines.append(
                f"  predicted on {cluster.hardware} at {p.rate:g} req/s (simulator, {p.requests} "
                f"requests, {p.completed} completed): P99 TTFT {_ms(p.p99_ttft_ms)}, P99 TBT "
                f"{_ms(p.p99_tbt_ms)}"
            )
    return "\n".join(lines)
