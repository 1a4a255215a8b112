"""Helpers shared by several test modules: byte comparison and a live server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import torch


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

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
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
