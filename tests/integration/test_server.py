"""The OpenAI-compatible server end to end: a real uvicorn server on a loopback port, a real engine
with two tenants of the built-in SmolLM2 sharing one arena, driven by the official `openai` client
(happy paths) and raw httpx (every error case, disconnects, shutdown)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import ServerThread

from oneiros.config import EngineConfig
from oneiros.core import ConfigError
from oneiros.server.app import build_app
from oneiros.server.async_engine import AsyncLLMEngine
from oneiros.server.launch import free_port, wait_healthy

uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def aengine() -> Iterator[AsyncLLMEngine]:
    import torch

    from oneiros.engine.engine import LLMEngine

    # One intra-op thread: on a small shared CPU box, torch's thread pool makes every op wait for a
    # second core (16 ms per op under load); a single thread is many times faster for this model.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = LLMEngine(
            EngineConfig(
                models={"a": "smollm2", "b": "smollm2"},
                memory_budget="1500MiB",
                max_model_len=1024,
            )
        )
    except ConfigError as e:  # the built-in model's package is missing
        pytest.skip(str(e))
    ae = AsyncLLMEngine(engine)
    ae.start()
    yield ae
    asyncio.run(ae.shutdown(0))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(aengine: AsyncLLMEngine) -> Iterator[ServerThread]:
    with ServerThread(build_app(aengine, api_key=None, max_queue=16)) as s:
        yield s


@pytest.fixture(scope="module")
def strict_server(aengine: AsyncLLMEngine) -> Iterator[ServerThread]:
    """A second app over the same engine, with an API key and room for 2 requests in flight."""
    with ServerThread(build_app(aengine, api_key=API_KEY, max_queue=2)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def memory(url: str, headers: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
    r = httpx.get(url + "/v1/memory", params=params, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_blocks_free(
    url: str, headers: dict[str, str] | None = None, timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        m = memory(url, headers)
        if m["kv_blocks_used"] == 0 and all(
            x["running"] == 0 and x["waiting"] == 0 for x in m["models"].values()
        ):
            return m
        assert time.monotonic() < deadline, f"KV blocks still in use: {m}"
        time.sleep(0.1)


def wait_kv_released(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Once idle, every KV page without a cached block goes back to the arena within a bounded
    time (pages of the prefix cache stay until their memory is needed)."""
    wait_blocks_free(url, headers)
    deadline = time.monotonic() + 10
    while True:
        m = memory(url, headers)
        if m["kv_pages_empty"] == 0:
            return m
        assert time.monotonic() < deadline, f"idle KV pages not released: {m['pages_by_owner']}"
        time.sleep(0.05)


def assert_error(r: httpx.Response, status: int, param: str | None = "any") -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers.get("x-request-id", "").startswith("req-")
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


# ---- happy paths through the openai client ------------------------------------------------------
def test_models(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["a", "b"]


def test_completion_and_request_id(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="a", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert raw.headers["x-request-id"].startswith("req-")
    c = raw.parse()
    assert c.object == "text_completion" and c.model == "a"
    assert c.choices[0].text and c.choices[0].finish_reason in ("length", "stop")
    assert c.usage.completion_tokens <= 4
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


def test_completion_token_ids_and_logprobs(client: openai.OpenAI) -> None:
    c = client.completions.create(
        model="b", prompt=[504, 3575, 282, 4649, 314], max_tokens=3, temperature=0, logprobs=2
    )
    lp = c.choices[0].logprobs
    assert c.usage.prompt_tokens == 5
    assert (
        len(lp.tokens)
        == len(lp.token_logprobs)
        == len(lp.top_logprobs)
        == c.usage.completion_tokens
    )
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_chat_paris_and_streaming_matches(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="a", messages=FRANCE, temperature=0, max_tokens=10)
    text = full.choices[0].message.content
    assert "Paris" in text
    assert full.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="a",
            messages=FRANCE,
            temperature=0,
            max_completion_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [full.choices[0].finish_reason]
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    )


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="b", messages=FRANCE, temperature=0, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_stop_strings(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": "a",
        "messages": FRANCE,
        "temperature": 0,
        "max_tokens": 12,
        "stop": ["Paris"],
    }
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "stop"
    text = r.choices[0].message.content
    assert "Paris" not in text and "capital" in text
    # Streaming holds back a possible start of the stop string, so nothing of it leaks out.
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kw, stream=True)
        if c.choices
    )
    assert streamed == text
    # A plain-string stop works on completions too.
    c = client.completions.create(
        model="b", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=" 6"
    )
    assert " 6" not in c.choices[0].text


def test_seed_reproducible(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": "b",
        "prompt": "Once upon a time",
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 1234,
    }
    first = client.completions.create(**kw).choices[0].text
    second = client.completions.create(**kw).choices[0].text
    assert first == second


def test_both_models_at_once(client: openai.OpenAI, server: ServerThread) -> None:
    results: dict[str, Any] = {}

    def ask(model: str) -> None:
        results[model] = client.chat.completions.create(
            model=model, messages=FRANCE, temperature=0, max_tokens=8
        )

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {r.model for r in results.values()} == {"a", "b"}
    assert all("Paris" in r.choices[0].message.content for r in results.values())
    m = wait_kv_released(server.url)
    owners = m["pages_by_owner"]
    assert (
        owners["a/resident"] == owners["b/resident"] > 0
        and owners["a/slab"] == owners["b/slab"] > 0
    )
    assert sum(owners.values()) == m["num_pages"]
    for name in ("a", "b"):
        info = m["models"][name]
        assert info["layers_resident"] == info["num_layers"] == 30
        # Idle KV pages went back to the arena (issue 18, defect 7); those kept hold the
        # conversation's cached prompt blocks (each at least one).
        assert info["kv_pages_empty"] == 0 and info["kv_blocks_used"] == 0
        assert info["kv_pages"] == owners.get(f"{name}/kv", 0) <= info["kv_blocks_cached"]


def test_metrics(client: openai.OpenAI, server: ServerThread, aengine: AsyncLLMEngine) -> None:
    client.completions.create(model="a", prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics", timeout=60).text
    for needle in (
        'oneiros_time_to_first_token_seconds_count{model="a"}',
        'oneiros_time_between_tokens_seconds_count{model="a"}',
        'oneiros_requests_running{model="b"} 0.0',
        'oneiros_requests_waiting{model="a"} 0.0',
        'oneiros_preemptions_total{model="a"}',
        'oneiros_arena_pages{owner="a/slab"}',
        'oneiros_arena_pages{owner="free"}',
        'oneiros_kv_blocks_used{model="a"} 0.0',
        'oneiros_kv_blocks_free{model="a"}',
        'oneiros_layers_resident{model="b"} 30.0',
        'oneiros_http_responses_total{endpoint="/v1/completions",status="200"}',
    ):
        assert needle in text, needle
    if hasattr(aengine.engine.tenants["a"], "state"):  # the engine's per-model counters
        assert 'oneiros_engine_steps_total{model="a"}' in text
        assert 'oneiros_decode_tokens_computed_total{model="a"}' in text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


# ---- errors, raw httpx --------------------------------------------------------------------------
TOO_LONG = list(range(100, 1200))  # 1100 token ids > the 1024-token context window

BAD_REQUESTS = [
    ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    (
        "/v1/chat/completions",
        {"model": "a", "messages": FRANCE, "max_tokens": 5000},
        400,
        "max_tokens",
    ),
    ("/v1/completions", {"model": "a", "prompt": TOO_LONG, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": "a", "prompt": "hi " * 1100, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": "a", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "a", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "a", "prompt": [1, -5]}, 400, "prompt"),
    ("/v1/completions", {"model": "a", "prompt": [1, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": "a", "prompt": 42}, 400, "any"),
    ("/v1/completions", {"model": "a"}, 400, "prompt"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "guided_json": {}}, 400, "guided_json"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "logit_bias": {"5": 101}}, 400,
     "logit_bias"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "logit_bias": {"999999": 1}}, 400,
     "logit_bias"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "presence_penalty": 3}, 400,
     "presence_penalty"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "allowed_token_ids": [10**7]}, 400,
     "allowed_token_ids"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "skip_special_tokens": False}, 400,
     "skip_special_tokens"),
    ("/v1/completions", {"model": "a", "prompt": ["x", ""]}, 400, "prompt"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "n": 40}, 400, "n"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "temperature": "hot"}, 400, "any"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "stop": 5}, 400, "any"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": "a", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),  # two models served: must name one
    ("/v1/chat/completions", {"model": "a", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "a", "messages": "hello"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": "a", "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "any",
    ),
    ("/v1/chat/completions", {"model": "a", "messages": FRANCE, "tools": [{}]}, 400, "tools"),
    (
        "/v1/chat/completions",
        {"model": "a", "messages": FRANCE, "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {"model": "a", "messages": FRANCE, "continue_final_message": True},
        400,
        "continue_final_message",
    ),
    ("/v1/chat/completions", {"model": "a", "messages": FRANCE, "min_tokens": 3}, 400,
     "min_tokens"),
    (
        "/v1/chat/completions",
        {"model": "a", "messages": FRANCE, "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    ("/v1/chat/completions", {"model": "a", "messages": FRANCE, "logprobs": 1}, 400, "logprobs"),
    (
        "/v1/chat/completions",
        {"model": "a", "messages": FRANCE, "max_completion_tokens": -3},
        400,
        "max_completion_tokens",
    ),
    ("/v1/completions", [1, 2, 3], 400, "any"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": "nope", "messages": FRANCE}, 404, "model"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    BAD_REQUESTS,
    ids=[
        f"{i}-{b if isinstance(b, list) else list(b)[-1]}"
        for i, (_, b, _s, _p) in enumerate(BAD_REQUESTS)
    ],
)
def test_bad_requests(
    server: ServerThread, path: str, body: Any, status: int, param: str | None
) -> None:
    assert_error(httpx.post(server.url + path, json=body, timeout=60), status, param)


def test_malformed_json_and_routes(server: ServerThread) -> None:
    for raw in (b"{not json", b"", b'{"model": "a", "prompt": "hi",}'):
        r = httpx.post(
            server.url + "/v1/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert_error(r, 400)
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(server.url + "/v1/completions"), 405)


def test_error_shape_through_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="missing", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="a", messages=FRANCE, extra_body={"use_beam_search": 1}
        )
    assert e.value.body["param"] == "use_beam_search"


def test_api_key(strict_server: ServerThread) -> None:
    url = strict_server.url
    assert_error(httpx.get(url + "/v1/models"), 401)
    assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "hi"}), 401)
    assert (
        httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code
        == 200
    )
    # Every route needs the key (issue 18, defect 4) except the liveness routes.
    for path in ("/metrics", "/openapi.json", "/docs", "/redoc", "/v1/memory", "/version",
                 "/v1/dashboard", "/dashboard"):
        r = httpx.get(url + path)
        assert_error(r, 401)
        assert r.headers["www-authenticate"].startswith(
            "Basic" if path.startswith(("/dashboard", "/docs", "/redoc", "/openapi")) else "Bearer"
        )
    assert_error(httpx.post(url + "/tokenize", json={"model": "a", "prompt": "hi"}), 401)
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # no details
    assert httpx.get(url + "/ping").status_code == 200
    authed = httpx.get(url + "/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert authed["models"] == ["a", "b"]
    # HTTP Basic with the key as the password (what a browser sends for /dashboard and /docs).
    assert httpx.get(url + "/metrics", auth=("anyone", API_KEY)).status_code == 200
    assert httpx.get(url + "/openapi.json", auth=("x", API_KEY)).status_code == 200
    assert_error(httpx.get(url + "/metrics", auth=("x", "wrong")), 401)
    c = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    assert len(c.models.list().data) == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()


def test_queue_limit_429(strict_server: ServerThread) -> None:
    url, auth = strict_server.url, {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "a", "prompt": "Tell me a long story.", "max_tokens": 500, "stream": True}
    with (
        httpx.Client(base_url=url, headers=auth, timeout=60) as h,
        h.stream("POST", "/v1/completions", json=body) as r1,
        h.stream("POST", "/v1/completions", json={**body, "model": "b"}) as r2,
    ):
        assert r1.status_code == r2.status_code == 200
        assert_error(h.post("/v1/completions", json={"model": "a", "prompt": "hi"}), 429)
        assert_error(h.post("/v1/chat/completions", json={"model": "b", "messages": FRANCE}), 429)
    wait_blocks_free(url, auth)  # closing the two streams aborted them


# ---- disconnects, engine failures, shutdown ------------------------------------------------------
def test_stream_disconnect_frees_kv(server: ServerThread, aengine: AsyncLLMEngine) -> None:
    body = {
        "model": "b",
        "messages": FRANCE,
        "max_tokens": 500,
        "stream": True,
        "stop": "never-matches-this",
    }
    with (
        httpx.Client(timeout=60) as h,
        h.stream("POST", server.url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        second = next(line for line in lines if line.startswith("data: "))  # a generated token
        assert json.loads(second[6:])["choices"][0]["delta"]["content"] is not None
        assert memory(server.url)["kv_blocks_used"] > 0
    wait_blocks_free(server.url)  # leaving the block closed the connection mid-stream
    aengine.call_sync(lambda e: e.check_integrity())
    assert memory(server.url, check="true")["integrity"] == "ok"


def test_unary_disconnect_frees_kv(server: ServerThread, aengine: AsyncLLMEngine) -> None:
    body = {
        "model": "a",
        "prompt": "Write a long essay about the sea.",
        "max_tokens": 500,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    wait_blocks_free(server.url)
    aengine.call_sync(lambda e: e.check_integrity())


def test_engine_step_error_fails_request_and_keeps_serving(
    client: openai.OpenAI, server: ServerThread, aengine: AsyncLLMEngine
) -> None:
    from oneiros.engine import faults

    errors_before = aengine.num_step_errors
    faults.install(faults.parse("step:1*1"))
    try:
        r = httpx.post(
            server.url + "/v1/completions",
            json={"model": "a", "prompt": "hi", "max_tokens": 2},
            timeout=60,
        )
        err = assert_error(r, 500)
        assert "injected fault: step" in err["message"] and err["type"] == "internal_error"
    finally:
        faults.install(None)
    assert aengine.num_step_errors == errors_before + 1
    wait_blocks_free(server.url)
    aengine.call_sync(lambda e: e.check_integrity())
    ok = client.completions.create(model="a", prompt="Hello", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_graceful_shutdown(server: ServerThread, aengine: AsyncLLMEngine) -> None:
    """Draining: new requests and /health get 503, a request in flight finishes; past the timeout
    the rest are aborted (their streams end with an error event) and their KV blocks freed. The
    engine is restarted at the end so the module's other tests are unaffected by the order they
    run in."""
    url = server.url
    body = {
        "model": "a",
        "prompt": "Count: one, two,",
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
    }
    try:
        with (
            httpx.Client(timeout=60) as h,
            h.stream("POST", url + "/v1/completions", json=body) as r,
        ):
            assert r.status_code == 200
            done = threading.Event()
            result: dict[str, int] = {}
            threading.Thread(
                target=lambda: (
                    result.update(aborted=asyncio.run(aengine.shutdown(60))),
                    done.set(),
                ),
                daemon=True,
            ).start()
            deadline = time.monotonic() + 10
            while aengine.is_accepting and time.monotonic() < deadline:
                time.sleep(0.01)
            assert_error(h.post(url + "/v1/completions", json={"model": "a", "prompt": "hi"}), 503)
            assert_error(h.get(url + "/health"), 503)
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length"  # finished, not cut off
        assert done.wait(60) and result["aborted"] == 0

        aengine.start()
        assert httpx.get(url + "/health").status_code == 200
        long = {**body, "max_tokens": 500}
        with (
            httpx.Client(timeout=60) as h,
            h.stream("POST", url + "/v1/completions", json=long) as r,
        ):
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it is generating
            aborted = asyncio.run(aengine.shutdown(0.2))
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert aborted == 1
        assert (
            events[-1] == "[DONE]"
            and json.loads(events[-2])["error"]["code"] == "server_shutting_down"
        )
        snap = memory(url)  # the engine thread is stopped: this runs on the caller's thread
        assert snap["kv_blocks_used"] == 0
        aengine.call_sync(lambda e: e.check_integrity())
    finally:
        aengine.start()
    assert httpx.get(url + "/health").status_code == 200


def test_body_too_large(server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999999\r\n\r\n{"
        )
        head = s.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413") and "x-request-id" in head.lower()


SERVE_CODE = """
import sys, torch
torch.set_num_threads(1)
from oneiros.config import EngineConfig
from oneiros.server.app import serve
serve(EngineConfig(models={"t": "random:llama-tiny"}, memory_budget="64MiB"), "127.0.0.1",
      int(sys.argv[1]), "k", 4, drain_timeout=60)
"""


def test_serve_drains_on_sigterm(tmp_path: Any) -> None:
    """serve() as `oneiros serve` runs it: SIGTERM turns new requests into 503 while the request in
    flight finishes, then the process exits 0."""
    import signal
    import subprocess
    import sys

    port = free_port()
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_CODE, str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_healthy(url, proc, 120, tmp_path / "serve.log", poll_s=0.2)
        # No tokenizer, so no text: logprobs make every step send a chunk.
        body = {
            "model": "t",
            "prompt": [1, 2, 3],
            "max_tokens": 300,
            "ignore_eos": True,
            "stream": True,
            "temperature": 0,
            "logprobs": 0,
        }
        with (
            httpx.Client(headers=auth, timeout=60) as h,
            h.stream("POST", url + "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while httpx.get(url + "/health", timeout=5).status_code == 200:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert_error(h.post(url + "/v1/completions", json={"model": "t", "prompt": [1]}), 503)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert (
            sum(len(json.loads(e)["choices"][0]["logprobs"]["tokens"]) for e in events[:-1]) > 100
        )
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "draining" in text and "Traceback" not in text
