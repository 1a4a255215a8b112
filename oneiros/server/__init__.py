"""OpenAI-compatible HTTP serving: `AsyncLLMEngine` (the engine on a background thread, asyncio
streams per request) and the FastAPI app (`build_app`, `serve`)."""

from oneiros.server.async_engine import (
    AsyncLLMEngine,
    EngineError,
    EngineShutdownError,
    EngineStepError,
    RequestStream,
)

__all__ = [
    "AsyncLLMEngine",
    "EngineError",
    "EngineShutdownError",
    "EngineStepError",
    "RequestStream",
]
