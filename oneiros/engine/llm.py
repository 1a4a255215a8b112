"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from oneiros.config import EngineConfig
from oneiros.core import RequestOutput, SamplingParams
from oneiros.engine.engine import LLMEngine

Prompt = str | list[int]


class LLM:
    """Load one model (`model=`) or several (`models={"name": source}`) into one arena and generate.

    Extra keyword arguments are `EngineConfig` fields (device, dtype, memory_budget, block_size,
    ...).
    """

    def __init__(
        self, model: str | None = None, models: dict[str, str] | None = None, **kwargs: Any
    ) -> None:
        if model is not None and models is not None:
            raise ValueError("pass either model= or models=, not both")
        if models is None:
            models = {_tenant_name(model or "smollm2"): model or "smollm2"}
        self.engine = LLMEngine(EngineConfig(models=dict(models), **kwargs))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        model: str | Sequence[str] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.
        `model` names the model of every prompt, or is a list with one model per prompt: the
        prompts of several models run batched together in one arena."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        mlist = [model] * len(prompts) if model is None or isinstance(model, str) else list(model)
        if len(mlist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(mlist)} models")
        reqs = [
            self.engine.add_request(p, sp or SamplingParams(), m)
            for p, sp, m in zip(prompts, plist, mlist, strict=True)
        ]
        return self._run([r.request_id for r in reqs])

    def chat(
        self,
        conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
        model: str | None = None,
    ) -> list[RequestOutput]:
        """Like generate, for chat messages formatted with the model's chat template."""
        single = conversations and isinstance(conversations[0], dict)
        convs = [conversations] if single else conversations
        reqs = [
            self.engine.add_request(None, params or SamplingParams(), model, messages=c)  # type: ignore[arg-type]
            for c in convs
        ]
        return self._run([r.request_id for r in reqs])

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]


def _tenant_name(source: str) -> str:
    """A short tenant name for a single-model LLM: the built-in name, a Hugging Face model ID as
    it is (org/name, as vLLM serves it), or the last path component."""
    from oneiros.models.loader import is_hub_id

    if is_hub_id(source):
        return source.partition("@")[0]
    name = source.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf") or "model"
