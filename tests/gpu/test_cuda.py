"""What only a GPU shows (skipped without CUDA; run with `pytest tests/gpu` on a device):

  - token identity on CUDA: greedy outputs with the Triton backend equal the PyTorch reference
    backend, with and without CUDA graphs, with and without non-resident layers (fp32 random
    models: the kernels use exact fp32 products there);
  - graphs are really captured and replayed (CudaGraphCapture), through batch-size changes and a
    restore that moves a layer (copy stream, no host wait), and stay exact;
  - a decode step replayed from a graph makes one host sync: the sampled tokens' copy;
  - the bandwidth probe gives plausible figures;
  - four models in an arena that holds the weights of about two (oversubscribed): restores on the
    copy stream and graphs keyed by the residency give the tokens of an ample arena;
  - KV pages of running requests moved on the device (compaction for a restore) keep every token.
"""

from __future__ import annotations

import warnings

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from oneiros.config import EngineConfig  # noqa: E402
from oneiros.core import SamplingParams  # noqa: E402
from oneiros.engine.engine import LLMEngine  # noqa: E402
from oneiros.engine.graphs import CudaGraphCapture  # noqa: E402
from oneiros.memory import remap  # noqa: E402
from oneiros.memory.bandwidth import probe  # noqa: E402

SOURCE = "random:llama-tiny"
LENGTHS = [3, 9, 17, 30, 41, 64, 100]
MAX_TOKENS = [4, 7, 10, 12, 16, 20, 24]


def engine(attention: str, graphs: bool, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(
        models={"m": SOURCE}, device="cuda", dtype="float32", attention=attention,
        cuda_graphs=graphs, memory_budget="256MiB", page_bytes=256 * 1024, block_size=16, **kw,
    ))


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def generate(e: LLMEngine, alpha: int = 0, on_step=None) -> list[list[int]]:
    t = e.tenants["m"]
    if alpha:
        e.evict_layers("m", remap.even_layers(t.num_layers, alpha))
    ids = [
        e.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), "m")
        .request_id
        for p, n in zip(prompts(t.model.cfg.vocab_size), MAX_TOKENS, strict=True)
    ]
    done = {}
    step = 0
    while e.has_unfinished():
        for out in e.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        if on_step is not None:
            on_step(e, step)
        e.check_integrity()
    return [done[i].token_ids for i in ids]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    return generate(engine("torch", graphs=False))


@pytest.mark.parametrize("attention", ["torch", "triton"])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("alpha", [0, 2])
def test_token_identity(reference, attention, graphs, alpha):
    e = engine(attention, graphs)
    assert generate(e, alpha) == reference
    g = e.executor.runners["m"].graphs
    if graphs:
        assert g is not None and isinstance(g.capturer, CudaGraphCapture)
        assert g.replays > 0 and g.captures > 0
    else:
        assert g is None


def test_a_restore_mid_run_recaptures(reference):
    e = engine("triton", graphs=True)
    t = e.tenants["m"]
    seen = {}

    def restore_once(e, step):
        g = e.executor.runners["m"].graphs
        if "captures" not in seen and g.replays >= 2:
            seen["captures"] = g.captures
            # Async, on the copy stream.
            assert e.restore_layers("m", t.residency.missing_layers[:1])

    assert generate(e, alpha=1, on_step=restore_once) == reference
    assert e.executor.runners["m"].graphs.captures > seen["captures"]


def test_four_models_where_two_fit_keep_their_tokens():
    from tests.integration.test_oversubscribed_models import TINY, run_phases, tiny_phases
    from tests.integration.test_remapping import weights_pages

    page = 64 * 1024
    one = weights_pages({"x": TINY["m0"]}, page)
    phases = tiny_phases(3)

    def cuda_engine(budget_pages: int, policy: str) -> LLMEngine:
        return LLMEngine(EngineConfig(
            models=TINY, device="cuda", dtype="float32", memory_budget=budget_pages * page,
            page_bytes=page, block_size=4, policy=policy, turn_steps=2,
        ))

    ref, _ = run_phases(cuda_engine(4 * one + 256, "recompute"), phases, 10)
    e = cuda_engine(2 * one + 4, "oneiros")
    assert e.oversubscribed
    tokens, slabs = run_phases(e, phases, 10)
    assert tokens == ref
    assert min(s["m0"] for s in slabs) == 0 and max(s["m3"] for s in slabs) > 0


def test_a_replayed_decode_step_syncs_once():
    e = engine("triton", graphs=True)
    vocab = e.tenants["m"].model.cfg.vocab_size
    for p in prompts(vocab)[:4]:
        e.add_request(p, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), "m")
    for _ in range(8):  # prefills, then the graph for batch 4 is captured
        e.step()
    g = e.executor.runners["m"].graphs
    replays = g.replays
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            e.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert g.replays == replays + 1
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


def test_probe_figures_are_plausible():
    bw = probe("cuda", nbytes=64 << 20, repeats=3)
    for x in (bw.h2d, bw.d2h, bw.mixed_h2d, bw.mixed_d2h):
        assert 1e9 < x < 2e12  # between 1 GB/s and 2 TB/s


def test_kv_pages_moved_on_the_device_keep_every_token():
    """Three models, all bursts at once, turns of two steps with turn reloads, on CUDA with
    graphs: restores need contiguous runs, so KV pages of running requests move on the device
    (after the copy streams' work, before the step's swaps and restores); the tokens are those
    of each model alone in an ample arena."""
    from tests.integration.test_remapping import (
        KV_MOVE_ATTEMPTS, KV_MOVES, every_burst_at_once, solo_tokens, total, workload_engine,
    )

    cuda = {"device": "cuda", "dtype": "float32"}
    ref = solo_tokens(**cuda)
    for _ in range(KV_MOVE_ATTEMPTS):
        e = workload_engine("oneiros", cuda_graphs=True, **KV_MOVES, **cuda)
        assert every_burst_at_once(e) == ref
        if total(e, "kv_pages_moved"):
            break
    assert total(e, "kv_pages_moved") > 0
