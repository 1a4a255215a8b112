"""schemathesis against a live server, bounded to about 40 s: every operation of the server's
own OpenAPI document, generation included (valid model names come from the document), checked for
5xx, undocumented status codes, content types and headers, response schemas, 405 with Allow and
invalid data being refused: no failure, no 5xx, and the engine's accounting intact afterwards.
benchmarks/fuzz.py runs the same for longer."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator

import pytest

from oneiros.config import EngineConfig
from oneiros.engine.engine import LLMEngine
from oneiros.server.app import build_app
from oneiros.server.async_engine import AsyncLLMEngine
from tests.helpers import ServerThread, tiny_llama_dir

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

if importlib.util.find_spec("schemathesis") is None:
    pytest.skip("schemathesis is not installed (requirements.txt pins it)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = str(tiny_llama_dir(tmp_path_factory.mktemp("tiny")))
    e = LLMEngine(EngineConfig(models={"a": path, "b": path}, memory_budget="256MiB",
                               max_model_len=96))
    ae = AsyncLLMEngine(e)
    with ServerThread(build_app(ae, max_queue=64)) as s:
        yield s
    asyncio.run(ae.shutdown(0))


def test_schemathesis_finds_nothing(server: ServerThread) -> None:
    from benchmarks.fuzz import fuzz

    report = fuzz(server.url, max_time=40, seed=0, workers=1)
    assert report["schemathesis_exit_code"] == 0, report["output_tail"]
    assert report["unique_failures"] == 0 and report["test_cases"] > 500
    assert report["server_errors_5xx"] == 0, report["responses_by_status"]
    assert report["generation_200"] > 20  # fuzzing reached generation, not just validation
    assert report["integrity"] == "ok"
