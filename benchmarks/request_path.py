"""How much code one request crosses, from the HTTP route to its sampled token.

Serves a small random-weight model in process (the real app and async engine, under Starlette's
TestClient), records every call into `oneiros` code on every thread while one completion request
runs (greedy, one token, a 24-token prompt), and reports the distinct functions, the modules they
live in, the lines of their bodies, and the hops: distinct calls from one module into another
(caller function -> callee function). Start-up, shutdown and the warm-up request are not counted.

    .venv/bin/python benchmarks/request_path.py [--out results/request_path.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import defaultdict
from pathlib import Path
from types import CodeType, FrameType

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PACKAGE = str(ROOT / "oneiros")


class Recorder:
    """A profile hook counting the oneiros functions called while `on` is set."""

    def __init__(self) -> None:
        self.on = False
        self.codes: dict[CodeType, int] = defaultdict(int)
        self.hops: set[tuple[CodeType, CodeType]] = set()

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if not (self.on and event == "call" and frame.f_code.co_filename.startswith(PACKAGE)):
            return
        self.codes[frame.f_code] += 1
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(PACKAGE):
            caller = caller.f_back  # through library frames (asyncio, starlette, torch)
        if caller is not None and caller.f_code.co_filename != frame.f_code.co_filename:
            self.hops.add((caller.f_code, frame.f_code))

    def report(self) -> dict:
        funcs = []
        for code, calls in self.codes.items():
            lines = [n for _, _, n in code.co_lines() if n is not None]
            body = max(lines) - code.co_firstlineno + 1 if lines else 1
            module = Path(code.co_filename).relative_to(ROOT).with_suffix("").as_posix()
            funcs.append({"module": module, "function": code.co_qualname, "lines": body,
                          "calls": calls})
        funcs.sort(key=lambda f: (f["module"], f["function"]))
        name = lambda c: f"{Path(c.co_filename).stem}.{c.co_qualname}"  # noqa: E731
        return {
            "hops": len(self.hops),
            "functions_called": len(funcs),
            "modules": len({f["module"] for f in funcs}),
            "lines": sum(f["lines"] for f in funcs),
            "functions": funcs,
            "hop_list": sorted(f"{name(a)} -> {name(b)}" for a, b in self.hops),
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "results" / "request_path.json"))
    args = p.parse_args()

    from fastapi.testclient import TestClient

    from oneiros.config import EngineConfig
    from oneiros.engine.engine import LLMEngine
    from oneiros.server.app import build_app
    from oneiros.server.async_engine import AsyncLLMEngine

    engine = LLMEngine(EngineConfig(models={"m": "random:llama-tiny"}, memory_budget="64MiB",
                                    h2d_bytes_per_s=1e10))
    rec = Recorder()
    threading.setprofile(rec)  # threads started from here on (the engine thread) are recorded
    sys.setprofile(rec)
    body = {"model": "m", "prompt": list(range(100, 124)), "max_tokens": 1, "temperature": 0}
    with TestClient(build_app(AsyncLLMEngine(engine))) as client:
        client.post("/v1/completions", json=body)  # warm-up: lazy imports, first compilation
        rec.on = True
        r = client.post("/v1/completions", json=body)
        rec.on = False
    sys.setprofile(None)
    threading.setprofile(None)
    if r.status_code != 200:
        print(r.text, file=sys.stderr)
        return 1
    rep = rec.report()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=1) + "\n")
    print(f"{rep['hops']} hops between modules; {rep['functions_called']} functions in "
          f"{rep['modules']} modules, {rep['lines']} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
