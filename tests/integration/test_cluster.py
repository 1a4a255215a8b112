"""The cluster end to end: a local Ray instance (started once for the module), two CPU engine
replicas behind the Ray Serve ingress, driven with the official `openai` client.

r0 holds SmolLM2 (`smol`) and a tiny random Llama with SmolLM2's tokenizer (`tok`); r1 holds `tok`
too, a tiny random Llama without a tokenizer (`a`) and another with one (`b`, whose streams show
text as they go). Each replica runs at most 3 requests and
queues 1 more (then 429). Bad input gets the same status and body as from a single server with the
same models. The last test kills r1's actor in the middle of a stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from oneiros.config import EngineConfig
from oneiros.engine.engine import LLMEngine
from oneiros.server.app import build_app
from oneiros.server.async_engine import AsyncLLMEngine
from oneiros.server.launch import free_port
from tests.helpers import ServerThread, tiny_llama_dir

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_intra_op_thread")]

MODELS = ["smol", "tok", "a", "b"]


def cluster_file(tok: str, tok1: str) -> dict[str, Any]:
    return {
        # r1's steps take 20 ms more, so that its long requests are still running when the tests
        # disconnect, fill its queue or kill it.
        "replicas": [{"name": "r0", "memory": "640MiB"},
                     {"name": "r1", "memory": "96MiB", "faults": "slow:1@0.02"}],
        "replica_cpus": 0.5,
        "max_ongoing_requests": 3,
        "max_queued_requests": 1,
        "engine": {"max_model_len": 256, "threads": 1},
        "models": {
            "smol": {"source": "smollm2", "pin": "r0", "kv_cache": "32MiB"},
            "tok": {"source": tok, "copies": 2},
            "a": {"source": "random:llama-tiny", "pin": "r1"},
            "b": {"source": tok1, "pin": "r1"},
        },
    }


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_llama_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tok1_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_llama_dir(tmp_path_factory.mktemp("tiny1"), layers=1))


@pytest.fixture(scope="module")
def cluster(tok_dir: str, tok1_dir: str) -> Iterator[str]:
    from oneiros.cluster.app import build_application
    from oneiros.cluster.config import parse_cluster, plan
    from oneiros.server.routes import ServerSettings

    config = parse_cluster(cluster_file(tok_dir, tok1_dir))
    placement, demands = plan(config)
    assert placement.holders("tok") == ["r0", "r1"]
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # Serve waits 60 s (not configurable) for its proxy actor's worker process to start; on a
        # loaded 2-core machine that start can take longer, so a first timeout gets one retry.
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            serve.shutdown()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(config, placement, ServerSettings(max_queue=64)),
                  name="oneiros", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(tok_dir: str, tok1_dir: str) -> Iterator[str]:
    """A single server with the same models, for the error bodies."""
    config = EngineConfig(models={"smol": "smollm2", "tok": tok_dir, "a": "random:llama-tiny",
                                  "b": tok1_dir}, memory_budget="700MiB", max_model_len=256)
    engine = AsyncLLMEngine(LLMEngine(config))
    with ServerThread(build_app(engine, max_queue=64)) as s:
        yield s.url
    asyncio.run(engine.shutdown(0))


def client(url: str) -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_listed_once_in_the_file_order(cluster: str) -> None:
    assert [m.id for m in client(cluster).models.list().data] == MODELS


def test_every_model_completes_streaming_and_not(cluster: str) -> None:
    c = client(cluster)
    r = c.completions.create(model="a", prompt=[1, 2, 3], max_tokens=5)
    assert r.usage.completion_tokens == 5 and r.model == "a"
    chunks = list(c.completions.create(model="a", prompt=[1, 2, 3], max_tokens=4, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4
    for model in ("tok", "smol"):
        r = c.chat.completions.create(model=model, max_tokens=6, temperature=0,
                                      messages=[{"role": "user", "content": "Hi there"}])
        assert r.choices[0].message.content and r.usage.completion_tokens <= 6
        streamed = c.chat.completions.create(
            model=model, max_tokens=6, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Hi there"}])
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
        assert text == r.choices[0].message.content  # greedy: the same tokens either way
    r = c.completions.create(model="tok", prompt="The sky is", max_tokens=4, temperature=0)
    assert r.choices[0].text


def test_unknown_model_is_404(cluster: str) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client(cluster).completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


BAD = [
    ("/v1/completions", {"model": "a", "prompt": [1], "max_tokens": -1}),
    ("/v1/completions", {"model": "a", "prompt": [1], "frobnicate": 1}),
    ("/v1/completions", {"model": "a", "prompt": [10**9], "max_tokens": 2}),
    ("/v1/completions", {"model": "a", "prompt": "text for a model without a tokenizer"}),
    ("/v1/completions", {"model": "a", "prompt": [1, 2], "max_tokens": 1000}),
    ("/v1/completions", {"model": "nope", "prompt": [1]}),
    ("/v1/completions", {"prompt": [1]}),
    ("/v1/chat/completions", {"model": "tok", "messages": []}),
    ("/v1/chat/completions", {"model": "tok", "messages": [{"role": "user", "content": "x"}],
                              "logit_bias": {"99999999": 1}}),
    ("/v1/chat/completions", {"model": "smol", "messages": "not a list"}),
    ("/v1/chat/completions", {"model": "tok", "n": 1000,
                              "messages": [{"role": "user", "content": "x"}]}),
]


@pytest.mark.parametrize("path, body", BAD)
def test_bad_input_gets_the_single_servers_error(cluster: str, single: str, path: str,
                                                 body: dict) -> None:
    got = httpx.post(cluster + path, json=body, timeout=60)
    want = httpx.post(single + path, json=body, timeout=60)
    assert 400 <= want.status_code < 500
    assert (got.status_code, got.json()) == (want.status_code, want.json())


def test_malformed_json_is_400(cluster: str, single: str) -> None:
    kw: dict[str, Any] = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    got = httpx.post(cluster + "/v1/completions", **kw)
    want = httpx.post(single + "/v1/completions", **kw)
    assert want.status_code == 400
    assert (got.status_code, got.json()) == (want.status_code, want.json())


def replica_numbers(url: str, name: str, model: str, replica: str) -> float:
    text = httpx.get(url + "/metrics", timeout=60).text
    key = f'{name}{{model="{model}",replica="{replica}"}} '
    lines = [line for line in text.splitlines() if line.startswith(key)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_model_on_two_replicas_is_served_by_both(cluster: str) -> None:
    """Equally loaded replicas take turns (least loaded first: see test_cluster_client.py)."""
    def prefill() -> dict[str, float]:
        return {r: replica_numbers(cluster, "oneiros_prefill_tokens_computed_total", "tok", r)
                for r in ("r0", "r1")}

    before = prefill()
    for _ in range(2):
        r = httpx.post(cluster + "/v1/completions", timeout=60,
                       json={"model": "tok", "prompt": "Count: one two", "max_tokens": 2})
        assert r.status_code == 200, r.text
    after = prefill()
    assert all(after[r] > before[r] for r in ("r0", "r1")), (before, after)


def test_metrics_memory_and_health_cover_every_replica(cluster: str) -> None:
    text = httpx.get(cluster + "/metrics", timeout=60).text
    assert 'oneiros_replica_up{replica="r0"} 1.0' in text
    assert 'oneiros_kv_blocks_used{model="a",replica="r1"}' in text
    assert 'vllm:num_requests_running{model_name="smol",replica="r0"}' in text
    mem = httpx.get(cluster + "/v1/memory", params={"check": "true"}, timeout=60).json()
    assert set(mem["replicas"]) == {"r0", "r1"} and mem["integrity"] == "ok"
    assert set(mem["replicas"]["r1"]["models"]) == {"tok", "a", "b"}
    assert set(mem["models"]) == set(MODELS)
    assert mem["num_pages"] == sum(r["num_pages"] for r in mem["replicas"].values())
    health = httpx.get(cluster + "/health", timeout=60).json()
    assert health["status"] == "ok"
    assert {r: v["state"] for r, v in health["replicas"].items()} == {"r0": "ok", "r1": "ok"}
    assert health["replicas"]["r1"]["models"] == ["tok", "a", "b"]
    dashboard = httpx.get(cluster + "/v1/dashboard", timeout=60)
    assert dashboard.status_code == 200 and dashboard.json()["num_pages"] == mem["num_pages"]


async def _open_streams(url: str, n: int) -> list[int]:
    body = {"model": "a", "prompt": [1, 2, 3], "max_tokens": 100, "ignore_eos": True,
            "stream": True}
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=120) as h:

        async def one() -> None:
            async with h.stream("POST", url + "/v1/completions", json=body) as r:
                statuses.append(r.status_code)
                if r.status_code == 429:
                    err = (await r.aread())
                    assert r.headers["retry-after"] == "1"
                    assert b'"code":"rate_limit_exceeded"' in err and b"rate_limit_error" in err
                else:
                    async for _ in r.aiter_lines():
                        pass

        await asyncio.gather(*(one() for _ in range(n)))
    return statuses


def test_a_full_replica_queue_is_429(cluster: str) -> None:
    statuses = asyncio.run(_open_streams(cluster, 8))
    assert set(statuses) == {200, 429}, statuses  # 3 run and 1 waits on r1; the rest: 429


def wait_until(check: Any, what: str, limit_s: float = 90.0) -> Any:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not yet
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.5)


def on_r1(url: str, model: str) -> dict[str, Any]:
    return httpx.get(url + "/v1/memory", timeout=60).json()["replicas"]["r1"]["models"][model]


def test_client_disconnect_aborts_on_the_replica(cluster: str) -> None:
    decoded = on_r1(cluster, "b")["counters"]["decode_tokens"]
    body = {"model": "b", "prompt": "Go on:", "max_tokens": 240, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", cluster + "/v1/completions",
                                                   json=body) as r:
        assert next(r.iter_lines()).startswith("data: ")

    def idle() -> dict[str, Any] | None:
        b = on_r1(cluster, "b")
        return b if b["running"] == b["waiting"] == b["kv_blocks_used"] == 0 else None

    b = wait_until(idle, "r1 to free the disconnected request's blocks")
    assert b["counters"]["decode_tokens"] - decoded < 239  # aborted before its end


def kill_replica(deployment: str) -> None:
    actors = ray.util.list_named_actors(all_namespaces=True)
    names = [a for a in actors if deployment in a["name"] and "SERVE_REPLICA" in a["name"]]
    assert len(names) == 1, actors
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)


def test_a_killed_replica_fails_its_streams_cleanly_and_comes_back(cluster: str) -> None:
    c = client(cluster)
    stream = c.completions.create(model="b", prompt="Go on:", max_tokens=240,
                                  extra_body={"ignore_eos": True}, stream=True)
    it = iter(stream)
    next(it)
    kill_replica("engine-r1")
    with pytest.raises(openai.APIError) as e:
        for _ in it:
            pass
    assert e.value.body["code"] == "engine_unavailable", e.value.body
    assert e.value.body["type"] == "service_unavailable"
    # Requests of `smol` (only on r0) go on meanwhile.
    r = c.completions.create(model="smol", prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens <= 2

    def later_request() -> bool:
        return c.completions.create(model="a", prompt=[1, 2], max_tokens=3).usage \
            .completion_tokens == 3

    wait_until(later_request, "a request to the restarted replica to succeed")
    health = wait_until(lambda: (h := httpx.get(cluster + "/health", timeout=60).json())
                        ["replicas"]["r1"]["state"] == "ok" and h, "r1 to be up again")
    assert health["status"] == "ok"
