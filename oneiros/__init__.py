"""Oneiros: multi-model LLM serving that remaps parameter memory into KV cache."""

from oneiros.core import (
    ConfigError,
    InvalidRequestError,
    OneirosError,
    RequestOutput,
    SamplingParams,
    UnknownModelError,
)

__all__ = [
    "LLM",
    "ConfigError",
    "EngineConfig",
    "InvalidRequestError",
    "LLMEngine",
    "OneirosError",
    "RequestOutput",
    "SamplingParams",
    "UnknownModelError",
]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import oneiros` must not import torch
    if name == "LLM":
        from oneiros.engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from oneiros.engine.engine import LLMEngine

        return LLMEngine
    if name == "EngineConfig":
        from oneiros.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
