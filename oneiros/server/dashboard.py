"""The live arena dashboard: /dashboard (a static page and script shipped in the package, no build
step, no CDN) and /v1/dashboard, the JSON it polls: per model the arena pages it owns (resident,
layer slabs, KV), layers remapped away, remap and restore events, queue and running requests, KV
usage and recent TTFT/TBT percentiles."""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict

from oneiros.bench.metrics import percentile
from oneiros.server.errors import ErrorJSON, error_body

STATIC = resources.files("oneiros.server") / "static"
_FILES = {"dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}


class DashboardModel(BaseModel):
    model_config = ConfigDict(extra="allow")
    names: list[str]
    pages: dict[str, int]
    num_layers: int
    layers_resident: int
    running: int
    waiting: int
    kv_usage: float
    kv_blocks_cached: int
    prefix_hit_rate: float | None
    remap_events: int
    restore_events: int
    preemptions: int
    ttft_p50: float | None
    ttft_p99: float | None
    tbt_p50: float | None
    tbt_p99: float | None


class DashboardResponse(BaseModel):
    time: float
    status: str
    page_bytes: int
    num_pages: int
    free_pages: int
    in_flight: int
    models: dict[str, DashboardModel]


def dashboard_data(state: Any, snap: dict[str, Any]) -> dict[str, Any]:
    m = state.metrics
    aliases: dict[str, list[str]] = {}
    for api, engine in state.names.items():
        aliases.setdefault(engine, []).append(api)
    models = {}
    for name, info in snap["models"].items():
        pages = {kind: 0 for kind in ("resident", "slab", "kv")}
        for owner, n in snap["pages_by_owner"].items():
            model, _, kind = owner.rpartition("/")
            if model == name:
                pages[kind] = pages.get(kind, 0) + n
        c = info.get("counters", {})
        ttft, tbt = m.recent(m.recent_ttft, name), m.recent(m.recent_tbt, name)
        cap = info.get("kv_block_capacity") or 0
        models[name] = {
            "names": aliases.get(name, [name]),
            "pages": pages,
            "num_layers": info["num_layers"],
            "layers_resident": info["layers_resident"],
            "running": info["running"],
            "waiting": info["waiting"],
            "kv_usage": info["kv_blocks_used"] / cap if cap else 0.0,
            "kv_blocks_cached": info.get("kv_blocks_cached", 0),
            "prefix_hit_rate": (c["prefix_cache_hits"] / c["prefix_cache_queries"]
                                if c.get("prefix_cache_queries") else None),
            "remap_events": c.get("remapped_layers", 0),
            "restore_events": c.get("restored_layers", 0),
            "preemptions": info["preemptions"],
            "ttft_p50": percentile(ttft, 0.5),
            "ttft_p99": percentile(ttft, 0.99),
            "tbt_p50": percentile(tbt, 0.5),
            "tbt_p99": percentile(tbt, 0.99),
        }
    return {
        "time": time.time(),
        "status": state.client.health().state,
        "page_bytes": snap["page_bytes"],
        "num_pages": snap["num_pages"],
        "free_pages": snap["free_pages"],
        "in_flight": state.admission.count,
        "models": models,
    }


def build_router(state: Any) -> APIRouter:
    r = APIRouter()

    @r.get("/dashboard", response_class=HTMLResponse,
           summary="The live arena dashboard (a page that polls /v1/dashboard)")
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "dashboard.html").read_text(encoding="utf-8"))

    @r.get("/dashboard/{name}", response_class=Response, include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in _FILES:
            return ErrorJSON(error_body(f"no dashboard file {name!r}", "not_found"),
                             status_code=404)
        return Response((STATIC / name).read_bytes(), media_type=_FILES[name])

    @r.get("/v1/dashboard", response_model=DashboardResponse)
    async def data() -> dict[str, Any]:
        return dashboard_data(state, await state.client.memory_snapshot())

    return r
