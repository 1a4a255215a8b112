"""The Ray Serve application: engine replicas and the OpenAI ingress over them.

    build_application(cluster, placement, settings) -> a bound Ray Serve application
    run_cluster(cluster, ...)                         (`oneiros serve --cluster`: until Ctrl-C)

`EngineReplica` is one deployment per planned replica (one AsyncLLMEngine with its models in one
arena; `num_gpus: 1` on GPU machines). Ray Serve bounds its queue (`max_ongoing_requests` running,
`max_queued_requests` waiting: beyond that the caller gets BackPressureError, a 429 at the
ingress) and restarts it when it dies. `Ingress` builds the single server's FastAPI app
(`oneiros.server.app.build_app`) over a `ClusterClient` of handles to the replicas: the same
routes, errors, streaming and API key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from oneiros.cluster.config import ClusterConfig
from oneiros.cluster.placement import Placement
from oneiros.core import InvalidRequestError, OneirosError, RequestOutput, SamplingParams
from oneiros.server.engine_client import EngineError
from oneiros.server.routes import ServerSettings

logger = logging.getLogger("oneiros.cluster")

APP_NAME = "oneiros"
INGRESS_SPARE = 32  # ingress requests beyond the generation limit: health, metrics, errors


def detached(out: RequestOutput) -> RequestOutput:
    """The output with plain lists (views of the request's lists would pickle them whole)."""
    import dataclasses

    return dataclasses.replace(
        out, token_ids=list(out.token_ids), logprobs=list(out.logprobs),
        top_logprobs=list(out.top_logprobs), token_times=list(out.token_times),
    )


@serve.deployment(health_check_period_s=2, health_check_timeout_s=10)
class EngineReplica:
    """One engine: its models in one arena, serving the ingress's handle calls."""

    def __init__(self, config: Any, threads: int | None = None, faults: str | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        from oneiros.engine import faults as fault_injection
        from oneiros.engine.engine import LLMEngine
        from oneiros.server.async_engine import AsyncLLMEngine

        self.engine = AsyncLLMEngine(LLMEngine(config))
        if faults:  # after loading: faults are for serving
            plan = fault_injection.configure(faults)
            logger.warning("fault injection is on: %s", plan.spec if plan else None)
        self.engine.start()

    def info(self) -> dict[str, tuple[int, int, Any]]:
        """model -> (context window, vocabulary size, tokenizer or None)."""
        e = self.engine
        return {m: (e.max_model_len(m), e.vocab_size(m), e.tokenizer(m)) for m in e.model_names}

    def health(self) -> str:
        return self.engine.health().state

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine died is restarted."""
        h = self.engine.health()
        if h.state == "dead":
            raise RuntimeError(f"the engine is dead: {h.error}")

    async def memory_snapshot(self) -> dict[str, Any]:
        snap = await self.engine.memory_snapshot()
        snap["in_flight"] = self.engine.num_in_flight
        return snap

    async def check_integrity(self) -> str:
        return await self.engine.check_integrity()

    async def generate(
        self, prompt: list[int], params: SamplingParams, model: str, request_id: str
    ) -> AsyncIterator[tuple]:
        """('accepted', submit_time), then ('output', RequestOutput)... ; or ('error', kind,
        message, param) at any point. Cancelling the call aborts the request."""
        try:
            stream = await self.engine.add_request(prompt, params, model, request_id)
        except Exception as e:  # noqa: BLE001 - reported to the ingress by name
            yield _error(e)
            return
        try:
            yield ("accepted", stream.submit_time)
            async for out in stream:
                yield ("output", detached(out))
        except Exception as e:  # noqa: BLE001 - reported to the ingress by name
            yield _error(e)
        finally:
            stream.close()  # aborts it when unfinished (the ingress cancelled the call)


def _error(e: Exception) -> tuple:
    """('error', kind, message, param): the engine's own errors by name; anything else is an
    engine failure (500) that says only its type."""
    if isinstance(e, (OneirosError, EngineError)):
        param = e.param if isinstance(e, InvalidRequestError) else None
        return ("error", type(e).__name__, str(e), param)
    logger.exception("request failed in the replica")
    return ("error", "EngineError", f"the engine failed: {type(e).__name__}", None)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The OpenAI server of the cluster (the single server's app over a ClusterClient)."""

    def __init__(self, settings: ServerSettings, order: list[str], **replicas: Any) -> None:
        self.settings = settings
        self.order = order  # the models in the cluster file's order (/v1/models lists them so)
        self.handles = replicas

    async def __serve_build_asgi_app__(self) -> Any:
        from oneiros.cluster.client import ClusterClient
        from oneiros.server.app import build_app

        app_name = serve.get_replica_context().app_name
        client = await ClusterClient.connect(self.handles, self.order, app_name=app_name)
        return build_app(client, settings=self.settings)


def build_application(
    cluster: ClusterConfig, placement: Placement, settings: ServerSettings | None = None
) -> Any:
    """The bound application: one EngineReplica deployment per planned replica, and the
    ingress."""
    engines = {}
    for r in placement.replicas:
        if not r.models:
            continue
        config = cluster.engine_config(r.models, r.memory_bytes)
        dep = EngineReplica.options(
            name=f"engine-{r.name}",
            num_replicas=1,
            max_ongoing_requests=cluster.max_ongoing_requests,
            max_queued_requests=cluster.max_queued_requests,
            ray_actor_options=cluster.actor_options(),
        )
        engines[r.name] = dep.bind(config, cluster.threads, cluster.faults.get(r.name))
    settings = settings or ServerSettings()
    # Ray Serve's default of 5 requests at once would queue the rest in its proxy: the ingress
    # takes as many as its own limit (--max-queue, then 429) and room for /health and /metrics.
    limit = settings.max_queue if settings.max_queue and settings.max_queue > 0 else 4096
    ingress = Ingress.options(max_ongoing_requests=limit + INGRESS_SPARE)
    return ingress.bind(settings, [m.name for m in cluster.models], **engines)


def run_cluster(
    cluster: ClusterConfig,
    placement: Placement,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
) -> int:
    """Start a local Ray instance (or join the one at `address` / $RAY_ADDRESS), deploy, serve
    until SIGINT/SIGTERM, then take the application down (and Ray Serve with it, when this
    process started Ray)."""
    import os
    import signal

    import ray

    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    ray.init(address=address, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(cluster, placement, settings), name=APP_NAME, route_prefix="/")
    logger.warning("serving on http://%s:%d (SIGINT or SIGTERM stops)", host, port)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        asyncio.run(_forever())
    except KeyboardInterrupt:
        pass
    finally:
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    return 0


async def _forever() -> None:
    while True:
        await asyncio.sleep(3600)
