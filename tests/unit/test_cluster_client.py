"""The ingress's ClusterClient over fake replica handles (no Ray cluster): routing to the least
loaded replica, Ray's failures turned into the server's errors, and cancellation of a closed
stream on its replica."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oneiros.cluster.client import ClusterClient, ModelInfo
from oneiros.core import InvalidRequestError, RequestOutput, SamplingParams
from oneiros.server.engine_client import EngineStepError, EngineUnavailableError
from oneiros.server.errors import APIError

pytest.importorskip("ray.serve")


def output(n: int, finished: bool) -> RequestOutput:
    return RequestOutput("r", "m", [1], list(range(n)), "", [], [], finished,
                         "length" if finished else None, 0.0, [0.0] * n)


class FakeGen:
    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)
        self.cancelled = False

    async def __anext__(self) -> Any:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """`handle.options(stream=True).generate.remote(...)` -> the next scripted FakeGen."""

    def __init__(self) -> None:
        self.scripts: list[list[Any]] = []
        self.gens: list[FakeGen] = []
        self.generate = self

    def options(self, **kw: Any) -> FakeHandle:
        return self

    def remote(self, *args: Any) -> FakeGen:
        gen = FakeGen(self.scripts.pop(0))
        self.gens.append(gen)
        return gen


def make() -> tuple[ClusterClient, dict[str, FakeHandle]]:
    handles = {"r0": FakeHandle(), "r1": FakeHandle()}
    c = ClusterClient(handles, {"m": ["r0", "r1"], "only1": ["r1"]},
                      {"m": ModelInfo(64, 100, None), "only1": ModelInfo(64, 100, None)})
    c._accepting = True
    c.states = {"r0": "ok", "r1": "ok"}
    return c, handles


def test_least_loaded_first_ties_in_turn_and_down_replicas_avoided() -> None:
    c, _ = make()
    assert [c.route("m") for _ in range(4)] == ["r0", "r1", "r0", "r1"]
    c.in_flight["r0"] = 2
    assert {c.route("m") for _ in range(3)} == {"r1"}
    c.in_flight["r0"] = 0
    c.states["r0"] = "unavailable"
    assert {c.route("m") for _ in range(3)} == {"r1"}
    c.states["r1"] = "starting"  # nothing up: try anyway (the handle waits for the restart)
    assert c.route("only1") == "r1"


def test_outputs_stream_and_close_cancels_an_unfinished_call() -> None:
    async def run() -> None:
        c, h = make()
        h["r0"].scripts.append([("accepted", 5.0), ("output", output(1, False)),
                                ("output", output(2, True))])
        s = await c.add_request([1], SamplingParams(), "m", "x")
        assert s.submit_time == 5.0 and c.in_flight["r0"] == 1
        outs = [o async for o in s]
        assert [len(o.token_ids) for o in outs] == [1, 2] and c.in_flight["r0"] == 0
        assert not h["r0"].gens[0].cancelled
        h["r1"].scripts.append([("accepted", 0.0), ("output", output(1, False))])
        s = await c.add_request([1], SamplingParams(), "m", "y")
        s.close()
        s.close()
        assert h["r1"].gens[0].cancelled and c.in_flight["r1"] == 0

    asyncio.run(run())


def test_replica_errors_become_the_servers_errors() -> None:
    from ray.serve.exceptions import BackPressureError

    async def run() -> None:
        c, h = make()
        h["r0"].scripts.append([("error", "InvalidRequestError", "bad max_tokens", "max_tokens")])
        with pytest.raises(InvalidRequestError) as e:
            await c.add_request([1], SamplingParams(), "m")
        assert e.value.param == "max_tokens"
        h["r1"].scripts.append([BackPressureError(num_queued_requests=1, max_queued_requests=1)])
        with pytest.raises(APIError) as e:
            await c.add_request([1], SamplingParams(), "m")
        assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
        assert c.states["r1"] == "ok"
        h["r0"].scripts.append([RuntimeError("actor died")])
        with pytest.raises(EngineUnavailableError):
            await c.add_request([1], SamplingParams(), "m")
        assert c.states["r0"] == "unavailable"
        h["r1"].scripts.append([("accepted", 0.0), ("output", output(1, False)),
                                RuntimeError("actor died")])
        s = await c.add_request([1], SamplingParams(), "m")
        with pytest.raises(EngineUnavailableError):
            async for _ in s:
                pass
        h["r1"].scripts.append([("accepted", 0.0), ("error", "EngineStepError", "boom", None)])
        s = await c.add_request([1], SamplingParams(), "only1")
        with pytest.raises(EngineStepError):
            async for _ in s:
                pass
        assert c.in_flight == {"r0": 0, "r1": 0}

    asyncio.run(run())


def test_the_single_servers_app_runs_over_the_cluster_client() -> None:
    """The routes, auth and error bodies of `build_app`, unchanged, over fake replicas."""
    from fastapi.testclient import TestClient

    from oneiros.server.app import build_app

    c, h = make()
    c.poll_s = 3600.0  # no Ray here: the poller never runs
    app = build_app(c, api_key="k")
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as t:
        assert t.get("/v1/models").status_code == 401
        assert [m["id"] for m in t.get("/v1/models", headers=auth).json()["data"]] == ["m",
                                                                                      "only1"]
        health = t.get("/health", headers=auth).json()
        assert health["replicas"]["r1"] == {"state": "ok", "models": ["m", "only1"],
                                            "in_flight": 0, "error": None}
        h["r1"].scripts.append([("accepted", 0.0), ("output", output(2, True))])
        r = t.post("/v1/completions", headers=auth,
                   json={"model": "only1", "prompt": [1, 2], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        h["r1"].scripts.append([("accepted", 0.0), RuntimeError("actor died")])
        r = t.post("/v1/completions", headers=auth,
                   json={"model": "only1", "prompt": [1, 2], "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        health = t.get("/health", headers=auth)
        assert health.status_code == 503 and "only1" in health.json()["error"]["message"]


def test_the_ingress_takes_as_many_requests_as_its_own_limit() -> None:
    """Not Ray Serve's default of 5 at once (the rest would wait in its proxy, unseen)."""
    from oneiros.cluster.app import INGRESS_SPARE, build_application
    from oneiros.cluster.config import parse_cluster, plan
    from oneiros.server.routes import ServerSettings

    cluster = parse_cluster({"replicas": 2, "replica_memory": "4MiB",
                             "engine": {"page_bytes": 65536, "block_size": 4},
                             "models": {"a": "random:llama-tiny"}})
    placement, _ = plan(cluster)
    app = build_application(cluster, placement, ServerSettings(max_queue=100))
    assert app._bound_deployment._deployment_config.max_ongoing_requests == 100 + INGRESS_SPARE
