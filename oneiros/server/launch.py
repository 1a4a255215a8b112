"""Starting a server in another process and waiting for it: a free local port, and a wait for
`/health` that fails at once when the process dies. For the tests, the benchmarks that drive a
live server (soak, fuzz) and anything else that launches `oneiros serve`."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A local TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    url: str, proc: subprocess.Popen, timeout_s: float, log: Path | None = None,
    poll_s: float = 0.3,
) -> None:
    """Return once `url`/health answers 200. RuntimeError when `proc` exits first or `timeout_s`
    passes; the message ends with the tail of `log` (the server's output) when given."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url.rstrip("/") + "/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not come up in {timeout_s:.0f} s{_tail(log)}")
        time.sleep(poll_s)


def _tail(log: Path | None) -> str:
    if log is None or not log.is_file():
        return ""
    return "\n" + log.read_text(errors="replace")[-3000:]
