"""The OpenAPI document, generated from the models the handlers validate with and then made to say
what the server really does: errors are 400 (never FastAPI's 422) with the OpenAI error body,
`model` names a served model (an enum) and is required when several engine models are served, the
API key is declared, and the liveness routes are marked open."""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from oneiros.server.middleware import LIVENESS_PATHS

_MODEL_FIELD_SCHEMAS = (
    "CompletionRequest",
    "ChatCompletionRequest",
    "TokenizeCompletionRequest",
    "TokenizeChatRequest",
    "DetokenizeRequest",
)
_TOKEN_FIELDS = ("prompt", "tokens", "allowed_token_ids", "stop_token_ids")
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def install_openapi(app: FastAPI, state: Any) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app, state)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_schema(app: FastAPI, state: Any) -> dict[str, Any]:
    with warnings.catch_warnings():  # one handler for several methods: ids are fixed below
        warnings.simplefilter("ignore")
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description="An OpenAI-compatible server (with vLLM's extensions) for several models "
            "in one memory arena. Errors: {\"error\": {message, type, param, code}}.",
            routes=app.routes,
        )
    seen: set[str] = set()
    for item in schema.get("paths", {}).values():
        for method, op in item.items():
            if op.get("operationId") in seen:
                op["operationId"] = f"{op['operationId']}_{method}"
            seen.add(op.get("operationId", ""))
    settings = state.settings
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    names = list(state.names)
    several = len(set(state.names.values())) > 1
    for name in _MODEL_FIELD_SCHEMAS:
        s = comps.get(name)
        if s is None:
            continue
        enum = {"type": "string", "enum": names, "description": "a served model name"}
        if several:
            s["properties"]["model"] = enum
            s.setdefault("required", []).append("model")
        else:
            s["properties"]["model"] = {"anyOf": [enum, {"type": "null"}]}
        # Token ids every served model accepts.
        vocab = min(state.client.vocab_size(m) for m in set(state.names.values()))
        for field in _TOKEN_FIELDS:
            if field in s["properties"]:
                _cap_ints(s["properties"][field], vocab - 1)
    if settings.api_key is not None:
        schema["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "basic": {"type": "http", "scheme": "basic",
                      "description": "any user name, the API key as the password"},
        }
        schema["security"] = [{"bearer": []}, {"basic": []}]
    open_paths = set(LIVENESS_PATHS) | ({"/metrics"} if settings.public_metrics else set())
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            responses = op.setdefault("responses", {})
            if responses.pop("422", None) is not None or "requestBody" in op:
                responses.setdefault("400", _error("bad request: the field is in error.param"))
                responses.setdefault("413", _error("request body too large"))
            if path in open_paths:
                op["security"] = []
                responses.pop("401", None)
            elif settings.api_key is not None:
                responses.setdefault("401", _error("missing or wrong API key"))
            else:
                responses.pop("401", None)
    return schema


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _cap_ints(node: Any, maximum: int) -> None:
    """Give every integer schema under `node` (token ids) its maximum."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = maximum
        for v in node.values():
            _cap_ints(v, maximum)
    elif isinstance(node, list):
        for v in node:
            _cap_ints(v, maximum)
