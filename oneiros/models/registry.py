"""Architecture name -> implementation, imported lazily so a CPU install stays light."""

from __future__ import annotations

import importlib

import torch

from oneiros.models.base import DecoderModel
from oneiros.models.config import ModelConfig

_ARCHS = {"llama": "oneiros.models.llama:LlamaModel", "opt": "oneiros.models.opt:OPTModel"}


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> DecoderModel:
    module, name = _ARCHS[cfg.arch].split(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(cfg, dtype, device)
