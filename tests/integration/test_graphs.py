"""Decode graphs (`engine/graphs.py`): the static-buffer path a CUDA graph replays, run on a CPU
with `EagerReplay` (the captured function runs at every replay, reading the same buffers).

  - greedy outputs equal eager steps while the batch shrinks through padded sizes (5 -> 8, 4, 2, 1);
  - with layers non-resident (their copies inside the captured pass) outputs are equal and every
    pass streamed the plan's copies;
  - a residency change (a layer restored to a new slab) drops the graphs, the model runs eagerly
    until the new layout has held, then captures again; outputs stay equal;
  - the Triton backend (interpreted) reads lengths instead of masks: equal outputs too;
  - graphs are captured per block-table width (a power of two of blocks over the longest context);
  - steps a graph cannot run (prefill, batch beyond the largest size, contexts past max_blocks)
    run eagerly.
"""

from __future__ import annotations

import os

import pytest
import torch

from oneiros.core import SamplingParams, ScheduledSeq, Step, StepPlan, StepResult
from oneiros.engine import graphs as graphs_module
from oneiros.engine.graphs import DecodeGraphs, EagerReplay, batch_sizes
from oneiros.memory.passplan import plan_pass
from tests.factories import make_request
from tests.integration.test_remapping import force_alpha, make_engine, prompts_for, run_all

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (lazily, below)

SOURCE = "random:llama-tiny"
LENGTHS = [3, 9, 17, 26, 24]  # the longest context crosses 8 blocks of 4 tokens mid-run
MAX_TOKENS = [4, 7, 10, 12, 16]  # requests finish at different steps: the batch shrinks


def generate(engine, graphs: bool, settle: int = 1) -> tuple[list[list[int]], DecodeGraphs | None]:
    runner = engine.executor.runners["m"]
    if graphs:
        runner.use_graphs(EagerReplay(), batch_sizes(8), settle_steps=settle)
    vocab = engine.tenants["m"].model.cfg.vocab_size
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), "m")
        .request_id
        for p, n in zip(prompts_for(vocab, LENGTHS, 3), MAX_TOKENS, strict=True)
    ]
    done = run_all(engine)
    return [done[i].token_ids for i in ids], runner.graphs


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    outs, _ = generate(make_engine({"m": SOURCE}, extra_pages=64), graphs=False)
    return outs


def test_padded_sizes_match_eager(reference):
    outs, graphs = generate(make_engine({"m": SOURCE}, extra_pages=64), graphs=True)
    assert outs == reference
    assert graphs is not None and graphs.replays > 0
    assert graphs.captures >= 4  # 8 (five running), 4, 2, 1 as requests finish
    # The longest context grows past 8 blocks of 4 tokens: tables 8, then 16 blocks wide.
    assert {w for _, w in graphs.captured} == {8, 16} and graphs.max_blocks > 16


def test_streamed_layers_inside_the_pass(reference):
    e = make_engine({"m": SOURCE}, extra_pages=4, prefetch_distance=2)
    force_alpha(e, "m", 2)
    outs, graphs = generate(e, graphs=True)
    assert outs == reference
    assert graphs.replays > 0
    t = e.tenants["m"]
    c = e.store.states["m"].counters
    plan = plan_pass(t.num_layers, t.residency.missing_layers, 2)
    assert c.h2d_bytes == c.steps * plan.num_copies * t.residency.layer_bytes
    e.check_integrity()


def test_streaming_replays_are_not_measurements_and_some_steps_run_timed(reference, monkeypatch):
    """Copies inside a replayed graph are not timed: such a step says so (timed False) and the
    remapping controller does not fold it into its step-time and exposure estimates; every
    TIMED_EVERY-th streaming step runs eagerly, timed, so the estimates keep coming."""
    monkeypatch.setattr(graphs_module, "TIMED_EVERY", 3)
    e = make_engine({"m": SOURCE}, extra_pages=4, prefetch_distance=2)
    force_alpha(e, "m", 2)
    runner = e.executor.runners["m"]
    timed: list[bool] = []
    sample = runner.sample

    def spy(*a, **kw):
        result = sample(*a, **kw)
        timed.append(result.timed)
        return result

    monkeypatch.setattr(runner, "sample", spy)
    outs, graphs = generate(e, graphs=True)
    assert outs == reference
    assert graphs.timed_steps > 0 and graphs.replays > 0
    assert timed.count(False) == graphs.replays  # every replay streamed, none was timed
    assert timed.count(True) >= graphs.timed_steps + 1  # the prefill and the eager steps


def test_the_controller_skips_untimed_steps():
    e = make_engine({"m": SOURCE}, extra_pages=4, policy="oneiros")
    remap = e.planner.remap
    step = Step(0.0)
    step.plans.append(StepPlan("m", [ScheduledSeq(make_request(8, model="m"), 8, 1)]))
    e.planner.observe(step, [StepResult([], [], [], elapsed=0.5, exposed_s=0.0, timed=False)])
    assert ("m", True) not in remap._step_s
    e.planner.observe(step, [StepResult([], [], [], elapsed=0.5, exposed_s=0.1)])
    assert remap._step_s["m", True] == pytest.approx(0.4)


def test_residency_change_recaptures(reference):
    e = make_engine({"m": SOURCE}, extra_pages=64)
    force_alpha(e, "m", 1)
    runner = e.executor.runners["m"]
    runner.use_graphs(EagerReplay(), batch_sizes(8), settle_steps=2)
    t = e.tenants["m"]
    vocab = t.model.cfg.vocab_size
    ids = [
        e.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), "m")
        .request_id
        for p, n in zip(prompts_for(vocab, LENGTHS, 3), MAX_TOKENS, strict=True)
    ]
    done, steps, restored_at = {}, 0, None
    while e.has_unfinished():
        for out in e.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        if restored_at is None and runner.graphs.replays >= 2:
            captures = runner.graphs.captures
            assert e.restore_layers("m", t.residency.missing_layers[:1])
            restored_at = runner.graphs.replays
        e.check_integrity()
    assert [done[i].token_ids for i in ids] == reference
    assert restored_at is not None
    assert runner.graphs.captures > captures  # the new layout was captured again
    assert not t.residency.missing_layers


def test_triton_reads_lengths(reference):
    pytest.importorskip("triton")
    e = make_engine({"m": SOURCE}, extra_pages=64, attention="triton", block_size=16,
                    max_model_len=64)  # narrow block tables: the interpreter is slow
    outs, graphs = generate(e, graphs=True)
    assert graphs.replays > 0
    assert outs == reference


def test_steps_a_graph_cannot_run():
    e = make_engine({"m": SOURCE}, extra_pages=64)
    runner = e.executor.runners["m"]
    runner.use_graphs(EagerReplay(), [1, 2], settle_steps=0)
    graphs = runner.graphs
    bs = runner.block_size

    def seq(context: int, new: int):
        from oneiros.core import ScheduledSeq

        req = make_request(prompt_len=context)
        req.block_ids = list(range(-(-context // bs)))
        return ScheduledSeq(req, context - new, new)

    assert graphs.key_for([seq(8, 1)]) == (1, 8)
    assert graphs.key_for([seq(8, 1), seq(5, 1)]) == (2, 8)
    assert graphs.key_for([seq(8, 1)] * 3) is None  # beyond the largest size
    assert graphs.key_for([seq(8, 3)]) is None  # a prefill chunk
    assert graphs.key_for([seq(graphs.max_blocks * bs + 1, 1)]) is None  # past the tables


def test_table_width_follows_the_longest_context():
    e = make_engine({"m": SOURCE}, extra_pages=64, block_size=4, max_model_len=100)
    runner = e.executor.runners["m"]
    runner.use_graphs(EagerReplay(), [1, 2], settle_steps=0)
    graphs = runner.graphs
    assert graphs.max_blocks == 25
    assert [graphs.width_for(n) for n in (1, 8, 9, 16, 17, 25)] == [8, 8, 16, 16, 25, 25]
    req = make_request(prompt_len=40)
    req.block_ids = list(range(10))
    from oneiros.core import ScheduledSeq

    assert graphs.key_for([ScheduledSeq(req, 39, 1)]) == (1, 16)  # 10 blocks -> width 16


def test_batch_sizes():
    assert batch_sizes(1) == [1]
    assert batch_sizes(3) == [1, 2, 4]
    assert batch_sizes(9) == [1, 2, 4, 8, 16]
    assert batch_sizes(128)[-1] == 128 and all(s % 8 == 0 for s in batch_sizes(128)[3:])
    with pytest.raises(ValueError):
        DecodeGraphs.__init__(object.__new__(DecodeGraphs), None, [4, 2], 1, EagerReplay())
