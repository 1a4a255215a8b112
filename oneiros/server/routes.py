"""The HTTP routes, as an APIRouter over a `ServerState` (an EngineClient plus the server's own
parts): OpenAI's /v1/models, /v1/completions, /v1/chat/completions; vLLM's /tokenize, /detokenize,
/version, /ping; /health (liveness), /metrics (Prometheus), /v1/memory (the arena as JSON)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import oneiros
from oneiros.core import InvalidRequestError, SamplingParams, UnknownModelError
from oneiros.server import formatting as fmt
from oneiros.server.async_engine import fit_max_tokens
from oneiros.server.engine_client import EngineClient, EngineDeadError, EngineShutdownError
from oneiros.server.errors import APIError, request_id
from oneiros.server.generation import Admission, Generation
from oneiros.server.metrics import ServerMetrics
from oneiros.server.middleware import AUTHORIZED_KEY
from oneiros.server.preprocess import Preprocessor
from oneiros.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    MemoryResponse,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)
from oneiros.server.streaming import SSEResponse, stream_events

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_BODY_BYTES = 32 << 20


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_queue: int | None = 256  # engine requests in flight before 429 (<= 0: no limit)
    max_body_bytes: int = MAX_BODY_BYTES
    public_metrics: bool = False  # /metrics without the API key (for scrapers that cannot send one)
    # API name -> engine model name (--served-model-name); the engine's names when empty.
    served_names: dict[str, str] = field(default_factory=dict)
    retry_after_s: int = 1


class ServerState:
    """Everything the routes share; one per app (several apps may share one client)."""

    def __init__(self, client: EngineClient, settings: ServerSettings) -> None:
        self.client = client
        self.settings = settings
        self.metrics = ServerMetrics()
        self.admission = Admission(settings.max_queue, settings.retry_after_s)
        self.pre = Preprocessor(client)
        self.started = int(time.time())
        names = settings.served_names or {n: n for n in client.model_names}
        unknown = sorted(set(names.values()) - set(client.model_names))
        if unknown:
            raise ValueError(f"served names point at models that are not loaded: {unknown}")
        self.names = dict(names)
        # The name a response reports for an engine model: its first API name.
        self.display: dict[str, str] = {}
        for api, engine in names.items():
            self.display.setdefault(engine, api)

    def check_available(self) -> None:
        h = self.client.health()
        if h.state == "dead":
            raise EngineDeadError(f"the engine is dead ({h.error}); nothing can be served")
        if not self.client.is_accepting:
            raise EngineShutdownError("the server is shutting down and accepts no new requests")

    def resolve(self, name: str | None) -> tuple[str, str]:
        """(engine model, the name responses report) of the request's `model`."""
        if name is None:
            engines = sorted(set(self.names.values()))
            if len(engines) == 1:
                return engines[0], self.display[engines[0]]
            raise InvalidRequestError(
                f"this server serves several models ({', '.join(self.names)}): name one", "model"
            )
        if name not in self.names:
            raise UnknownModelError(
                f"the model {name!r} does not exist (served: {', '.join(self.names)})"
            )
        return self.names[name], name

    def admit(self, body: Any) -> tuple[str, str]:
        """The checks every generation request passes before any work: the engine is alive, the
        model exists, the fields are supported and their token ids in its vocabulary. Returns
        (engine model, the name responses report)."""
        self.check_available()
        model, display = self.resolve(body.model)
        body.check_supported()
        self.check_token_ids(model, body)
        return model, display

    def check_token_ids(self, model: str, body: Any) -> None:
        """Token ids in sampling fields must be in the model's vocabulary."""
        m = self.pre.loop[model]
        for name in ("stop_token_ids", "allowed_token_ids"):
            m.check_range(getattr(body, name, None) or [], name)
        m.check_range(list(body.logit_bias_ids()), "logit_bias")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in (
        (400, "bad request: the field is in error.param"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "too many requests in flight (see Retry-After)"),
        (500, "the engine failed while running the request"),
        (503, "shutting down, or the engine is dead"),
    )
}
# OpenAPI 3.1 without itemSchema: the schema of a text/event-stream describes one event.
SSE = {"text/event-stream": {"schema": {
    "type": "object",
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE]"},
                   "event": {"type": "string"}},
    "required": ["data"],
}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: ERRORS[c] for c in codes}


def sibling_seed(params: SamplingParams, j: int) -> SamplingParams:
    """Sibling j of n: seeded requests get seed + j (wrapped into 64 bits), so they differ."""
    if j == 0 or params.seed is None:
        return params
    seed = (params.seed + j + 2**63) % 2**64 - 2**63
    return dataclasses.replace(params, seed=seed)


def build_router(state: ServerState) -> APIRouter:
    r = APIRouter()
    client, pre = state.client, state.pre

    def generation(request: Request, kind: str, model: str) -> Generation:
        return Generation(client, state.admission, state.metrics, request_id(request), kind,
                          model)

    # ---- liveness and information ----
    @r.get("/health", response_model=HealthResponse, responses=_errors(503),
           summary="Liveness (open without the API key): 200 while the engine serves")
    async def health(request: Request) -> JSONResponse:
        h = client.health()
        if h.state == "dead":
            raise APIError(503, f"the engine is dead: {h.error}", "service_unavailable", None,
                           "engine_dead")
        if h.state == "unavailable":
            raise APIError(503, f"the cluster cannot serve every model: {h.error}",
                           "service_unavailable", None, "engine_unavailable")
        if not h.ok:
            raise APIError(503, "the server is shutting down", "service_unavailable", None,
                           "server_shutting_down")
        data: dict[str, Any] = {"status": h.state}
        if request.scope.get(AUTHORIZED_KEY):
            data.update(
                models=list(state.names), in_flight=state.admission.count,
                engine_steps=h.steps, engine_step_errors=h.step_errors,
                last_step_error=h.last_step_error,
            )
            if h.replicas is not None:
                data["replicas"] = h.replicas
        return JSONResponse(data)

    r.add_api_route("/ping", health, methods=["GET", "POST"], response_model=HealthResponse,
                    responses=_errors(503), summary="Liveness, as vLLM's /ping",
                    operation_id="ping")

    @r.get("/version", response_model=VersionResponse, responses=_errors(401))
    async def version() -> dict[str, str]:
        return {"version": oneiros.__version__}

    @r.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": api,
                    "object": "model",
                    "created": state.started,
                    "owned_by": "oneiros",
                    "root": engine,
                    "parent": None if state.display[engine] == api else state.display[engine],
                    "max_model_len": client.max_model_len(engine),
                }
                for api, engine in state.names.items()
            ],
        }

    @r.get("/v1/memory", response_model=MemoryResponse, responses=_errors(401, 503))
    async def memory(check: bool = False) -> dict[str, Any]:
        snap = await client.memory_snapshot()
        if check:
            snap["integrity"] = await client.check_integrity()
        snap["in_flight"] = state.admission.count
        return snap

    @r.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Prometheus text format"},
        **_errors(401)})
    async def prometheus() -> Response:
        e = state.metrics.engine
        e.in_flight = state.admission.count
        h = client.health()
        e.step_errors = h.step_errors
        with contextlib.suppress(Exception):
            e.snapshot = await asyncio.wait_for(client.memory_snapshot(), 30)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---- tokenizer ----
    @r.post("/tokenize", response_model=TokenizeResponse, responses=_errors(400, 401, 404))
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
        model, _ = state.resolve(body.model)
        if isinstance(body, TokenizeChatRequest):
            if body.add_generation_prompt and body.continue_final_message:
                raise InvalidRequestError(
                    "continue_final_message and add_generation_prompt cannot both be true",
                    "continue_final_message",
                )
            ids = await pre.chat_ids(
                model, [m.to_template() for m in body.messages],
                bool(body.add_generation_prompt), bool(body.continue_final_message),
                bool(body.add_special_tokens),
            )
        else:
            ids = await pre.prompt_ids(model, body.prompt, "prompt",
                                       bool(body.add_special_tokens))
        strs = await pre.token_strs(model, ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": client.max_model_len(model), "tokens": ids,
                "token_strs": strs}

    @r.post("/detokenize", response_model=DetokenizeResponse, responses=_errors(400, 401, 404))
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        model, _ = state.resolve(body.model)
        if pre.loop[model].hf is None:
            raise InvalidRequestError(f"model {model!r} has no tokenizer", "model")
        return {"prompt": await pre.decode(model, list(body.tokens))}

    # ---- generation ----
    @r.post("/v1/completions", response_model=CompletionResponse,
            responses={200: {"content": SSE}, **_errors(400, 401, 404, 413, 429, 500, 503)})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model, display = state.admit(body)
        n = body.num_choices
        max_tokens = (
            body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        )
        base = body.sampling_params(max_tokens, body.logprobs)
        prompts = body.prompts()
        limit = client.max_model_len(model)
        ids_list = []
        for p in prompts:
            ids = await pre.prompt_ids(model, p, "prompt", bool(body.add_special_tokens))
            if body.truncate_prompt_tokens is not None:
                ids = ids[-body.truncate_prompt_tokens:]
            ids_list.append(ids)
        requests = []
        for ids in ids_list:
            params = fit_max_tokens(base, len(ids), limit, False, "prompt")
            requests += [(ids, sibling_seed(params, j)) for j in range(n)]
        echo: list[str] | None = None
        if body.echo:
            texts = [p if isinstance(p, str) else await pre.decode(model, ids)
                     for p, ids in zip(prompts, ids_list, strict=True)]
            echo = [t for t in texts for _ in range(n)]
        gen = generation(request, "completion", model)
        await gen.start(requests)
        meta = fmt.ResponseMeta(fmt.response_id(gen.rid, False), gen.created, display, False)
        token_str = _token_str(pre, model)
        if body.stream:
            events = stream_events(gen, meta, token_str, base.stop, body.logprobs is not None,
                                   body.include_usage, n, echo)
            return SSEResponse(events, on_close=gen.close)
        outs = await gen.collect(request)
        if outs is None:
            return Response(status_code=499)
        choices = []
        for k, out in enumerate(outs):
            prefix = echo[k] if echo else ""
            lp = (fmt.completion_logprobs(token_str, out, 0, len(prefix))
                  if body.logprobs is not None else None)
            choices.append(fmt.completion_choice(k, prefix + out.text, out.finish_reason, lp))
        return JSONResponse(fmt.body(meta, choices, fmt.total_usage(outs, n)))

    @r.post("/v1/chat/completions", response_model=ChatCompletionResponse,
            responses={200: {"content": SSE}, **_errors(400, 401, 404, 413, 429, 500, 503)})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model, display = state.admit(body)
        n = body.num_choices
        requested = body.requested_max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        base = body.sampling_params(requested if requested is not None else 1, logprobs)
        ids = await pre.chat_ids(
            model, body.template_messages(), bool(body.add_generation_prompt),
            bool(body.continue_final_message), bool(body.add_special_tokens),
        )
        if body.truncate_prompt_tokens is not None:
            ids = ids[-body.truncate_prompt_tokens:]
        # Without a limit, max_tokens is the room the prompt leaves (OpenAI's default for chat).
        params = fit_max_tokens(base, len(ids), client.max_model_len(model), requested is None,
                                "messages")
        gen = generation(request, "chat", model)
        await gen.start([(ids, sibling_seed(params, j)) for j in range(n)])
        meta = fmt.ResponseMeta(fmt.response_id(gen.rid, True), gen.created, display, True)
        token_str = _token_str(pre, model)
        if body.stream:
            events = stream_events(gen, meta, token_str, params.stop, bool(body.logprobs),
                                   body.include_usage, n)
            return SSEResponse(events, on_close=gen.close)
        outs = await gen.collect(request)
        if outs is None:
            return Response(status_code=499)
        choices = [
            fmt.chat_choice(k, out.text, out.finish_reason,
                            fmt.chat_logprobs(token_str, out, 0) if body.logprobs else None)
            for k, out in enumerate(outs)
        ]
        return JSONResponse(fmt.body(meta, choices, fmt.total_usage(outs, n)))

    return r


def _token_str(pre: Preprocessor, model: str) -> fmt.TokenStr:
    return lambda t: pre.token_str(model, t)


def endpoints(router: APIRouter, extra: Sequence[str] = ()) -> frozenset[str]:
    """The paths the router serves (the endpoint label of the response counter)."""
    return frozenset({getattr(route, "path", "") for route in router.routes} | set(extra))
