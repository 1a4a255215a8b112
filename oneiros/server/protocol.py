"""Pydantic models of the OpenAI request and response bodies: the handlers validate with them and
the OpenAPI document is generated from them.

One rule for every field: a field is implemented, or the request is refused with a 400 that names
it. Types are strict (a string where a number belongs is a 400, not a coercion). Fields nobody
defined are refused (`extra="forbid"`), as OpenAI does; OpenAI fields we cannot honour are accepted
only at their no-op values (`tools` empty, `response_format` text, `best_of` equal to n, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from oneiros.core import InvalidRequestError, SamplingParams

Number = StrictInt | StrictFloat
TokenIds = Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1)]
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request (prompts x n)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False


class _Sampling(_Body):
    model: StrictStr | None = Field(None, description="a served model name (see /v1/models)")
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=100)
    top_p: Number | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = Field(None, ge=1, le=MAX_N)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    logit_bias: dict[StrictStr, Number] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100]"
    )
    user: StrictStr | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    service_tier: Literal["auto", "default"] | None = None
    # vLLM's sampling extensions
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Number | None = Field(None, ge=0, le=1)
    repetition_penalty: Number | None = Field(None, gt=0, le=2)
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[Annotated[int, Field(strict=True, ge=0)]] | None = None
    include_stop_str_in_output: StrictBool | None = None
    allowed_token_ids: TokenIds | None = None
    skip_special_tokens: Literal[True] | None = Field(
        None, description="only true (special tokens are always left out of the text)"
    )
    spaces_between_special_tokens: Literal[True] | None = None
    truncate_prompt_tokens: StrictInt | None = Field(
        None, ge=1, description="keep only the last N prompt tokens"
    )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    def logit_bias_ids(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise InvalidRequestError(
                    f"logit_bias keys are token ids written as strings, got {key!r}", "logit_bias"
                )
            out[int(key)] = float(value)
        return out

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=self.top_k or 0,
            min_p=float(self.min_p or 0.0),
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
            repetition_penalty=(
                1.0 if self.repetition_penalty is None else float(self.repetition_penalty)
            ),
            logit_bias=self.logit_bias_ids(),
            allowed_token_ids=tuple(self.allowed_token_ids) if self.allowed_token_ids else None,
        )


class CompletionRequest(_Sampling):
    prompt: StrictStr | TokenIds | list[StrictStr] | list[TokenIds] = Field(
        description="a text, token ids, or a batch of either"
    )
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool | None = False
    suffix: Literal[""] | None = Field(None, description="not supported: only empty")
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N, description="must equal n")
    add_special_tokens: StrictBool | None = True

    def check_supported(self) -> None:
        if self.best_of is not None and self.best_of != self.num_choices:
            raise InvalidRequestError(
                f"best_of must equal n ({self.num_choices}): choices are not ranked", "best_of"
            )
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "echo with logprobs needs prompt log-probabilities, which are not computed",
                "echo",
            )

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one text or token-id list, or a batch of them."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if len(p) * self.num_choices > MAX_CHOICES:
            raise InvalidRequestError(
                f"{len(p)} prompts x n={self.num_choices} is more than {MAX_CHOICES} choices",
                "prompt",
            )
        return list(p)  # type: ignore[arg-type]


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = None

    def to_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = Field(None, max_length=0, description="not supported: only empty")
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    store: Literal[False] | None = None
    # vLLM's chat extensions
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    add_special_tokens: StrictBool | None = False

    def check_supported(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidRequestError(
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise InvalidRequestError(
                "continue_final_message needs an assistant message last", "continue_final_message"
            )

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]


class TokenizeCompletionRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool | None = True
    return_token_strs: StrictBool | None = False


class TokenizeChatRequest(_Body):
    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    add_special_tokens: StrictBool | None = False
    return_token_strs: StrictBool | None = False


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[Annotated[int, Field(strict=True, ge=0)]]


# ---- responses -----------------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "abort"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    system_fingerprint: None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class HealthResponse(BaseModel):
    status: Literal["ok", "draining", "starting", "dead", "unavailable"]
    error: str | None = None
    replicas: dict[str, Any] | None = None
    models: list[str] | None = None
    in_flight: int | None = None
    engine_steps: int | None = None
    engine_step_errors: int | None = None
    last_step_error: str | None = None


class MemoryResponse(BaseModel):
    """The arena and per-model state (free-form beyond these fields)."""

    model_config = ConfigDict(extra="allow")
    page_bytes: int
    num_pages: int
    free_pages: int
    pages_by_owner: dict[str, int]
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_cached: int = Field(0, description="blocks kept for prefix cache hits, held by no "
                                  "request (the first memory given away)")
    kv_pages: int
    kv_pages_empty: int = Field(0, description="KV pages holding no held or cached block (given "
                                "back to the arena once the engine is idle)")
    models: dict[str, dict[str, Any]]
    in_flight: int
    integrity: str | None = None
