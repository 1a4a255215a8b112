"""The start-up copy probe (`memory/bandwidth.py`) and its cache; the controller takes its T_T
from it unless the configuration gives one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oneiros.memory.bandwidth import Bandwidth, cached_probe, load_or_measure, probe

MiB = 1 << 20


def test_probe_measures_four_positive_figures():
    bw = probe("cpu", nbytes=MiB, repeats=2)
    assert bw.device == "cpu" and bw.nbytes == MiB
    for x in (bw.h2d, bw.d2h, bw.mixed_h2d, bw.mixed_d2h):
        assert 0 < x < float("inf")
    assert "GB/s" in bw.describe()
    assert cached_probe("cpu").h2d > 0  # a CPU is probed every time, nothing is stored


@pytest.mark.parametrize("nbytes,repeats", [(0, 1), (MiB, 0)])
def test_probe_rejects_empty_work(nbytes, repeats):
    with pytest.raises(ValueError):
        probe("cpu", nbytes=nbytes, repeats=repeats)


def fake(h2d: float) -> Bandwidth:
    return Bandwidth("cuda:Fake", MiB, h2d, h2d / 2, h2d / 3, h2d / 4)


def test_cache_measures_once_per_key(tmp_path: Path):
    cache = tmp_path / "sub" / "bandwidth.json"
    calls = []

    def measure(h2d: float):
        def run():
            calls.append(h2d)
            return fake(h2d)

        return run

    assert load_or_measure(cache, "cuda:A", measure(1e9)).h2d == 1e9
    assert load_or_measure(cache, "cuda:A", measure(5e9)).h2d == 1e9  # from the file
    assert load_or_measure(cache, "cuda:B", measure(2e9)).h2d == 2e9
    assert calls == [1e9, 2e9]
    assert set(json.loads(cache.read_text())) == {"cuda:A", "cuda:B"}


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"cuda:A": {"h2d": 1}}'])
def test_a_bad_cache_is_measured_over(tmp_path: Path, content: str):
    cache = tmp_path / "bandwidth.json"
    cache.write_text(content)
    assert load_or_measure(cache, "cuda:A", lambda: fake(3e9)).h2d == 3e9
    assert json.loads(cache.read_text())["cuda:A"]["h2d"] == 3e9


def test_an_unwritable_cache_still_answers(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert load_or_measure(blocker / "bandwidth.json", "k", lambda: fake(1e9)).h2d == 1e9


def test_configured_bandwidth_overrides_the_probe():
    from oneiros.config import EngineConfig
    from oneiros.engine.engine import LLMEngine

    e = LLMEngine(EngineConfig(models={"m": "random:llama-tiny"}, policy="oneiros",
                               memory_budget="64MiB", page_bytes=64 * 1024, h2d_bytes_per_s=2e9))
    assert e.remapper is not None and e.remapper.h2d_bytes_per_s == 2e9
