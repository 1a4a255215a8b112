"""Attention backends behind one interface: `write_kv(kv, k, v, meta)` and
`attend(q, k_new, v_new, kv, meta, scale=None)` over the arena's paged KV layout.

  torch   the PyTorch reference (`torch_ref`): any device.
  triton  Triton kernels (`triton_paged`): CUDA; on a CPU only under TRITON_INTERPRET=1 (tests).

Backends are imported lazily, so Triton is needed only when it is used.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

BACKENDS = {"torch": "oneiros.attention.torch_ref", "triton": "oneiros.attention.triton_paged"}


def load(name: str) -> ModuleType:
    from oneiros.core import ConfigError

    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r} (use {', '.join(BACKENDS)})")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise ConfigError(f"attention backend {name!r} cannot be loaded here: {e}") from None


def choose(requested: str, device_type: str, block_size: int, head_dims: list[int]) -> str:
    """`auto`: Triton on CUDA when it is installed and the shapes suit its kernels (tl.dot needs
    16-wide tiles), else the reference. An explicit name is taken as it is."""
    if requested != "auto":
        return requested
    if device_type != "cuda" or block_size < 16 or min(head_dims) < 16:
        return "torch"
    return "triton" if importlib.util.find_spec("triton") is not None else "torch"
