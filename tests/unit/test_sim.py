"""The simulator: cost model, layer streaming replay, calibration, and whole-engine sanity."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from oneiros.config import EngineConfig
from oneiros.core import ConfigError, SamplingParams
from oneiros.engine.engine import LLMEngine
from oneiros.sim.calibrate import fit, read_steps, step_noise
from oneiros.memory.passplan import HostLink, PassRun, exposed_fraction, plan_pass, replay
from oneiros.sim.cost import ModelCost, StepWork, compute_time, flops_bytes, overhead_time
from oneiros.sim.hardware import PROFILES, load_profile

GH200 = PROFILES["gh200"]
C1 = {"opt": "random:opt-13b", "llama2": "random:llama-2-13b", "llama3": "random:llama-3-8b"}


def _cost(layers: int = 32) -> ModelCost:
    return ModelCost(layers, 200_000_000, 500_000_000, 32, 128, layers * 2 * 8 * 128)


# ---- cost model ---------------------------------------------------------------------------------
def test_decode_is_memory_bound_and_prefill_compute_bound_on_a_gpu():
    m = _cost()
    f, b = flops_bytes(m, StepWork(tokens=1, sampled=1, attn_pairs=512, kv_read_tokens=512), 2)
    assert f / (GH200.peak_flops * GH200.compute_eff) < b / (GH200.mem_bw * GH200.mem_eff)
    f, b = flops_bytes(m, StepWork(4096, 1, 4096 * 2048, 4096), 2)
    assert f / (GH200.peak_flops * GH200.compute_eff) > b / (GH200.mem_bw * GH200.mem_eff)


def test_compute_time_roofline_and_overlap():
    hw = replace(GH200, compute_eff=1.0, mem_eff=1.0, overlap=0.0)
    assert compute_time(hw, hw.peak_flops, hw.mem_bw * 2) == pytest.approx(2.0)
    assert compute_time(replace(hw, overlap=1.0), hw.peak_flops, hw.mem_bw * 2) == pytest.approx(3.0)


def test_the_link_serves_each_direction_in_order_and_mixes_when_both_are_busy():
    link = HostLink(GH200.h2d_bw, GH200.d2h_bw, GH200.mixed_bw)
    one = link.copy("h2d", 1e9, 0.0)
    assert one == pytest.approx(1e9 / GH200.h2d_bw)
    second = link.copy("h2d", 1e9, 0.0)  # queued behind the first
    assert second == pytest.approx(2e9 / GH200.h2d_bw)
    back = link.copy("d2h", 1e9, 0.0)  # the other direction is busy: the mixed bandwidth
    assert back == pytest.approx(1e9 / GH200.mixed_bw)
    later = link.copy("d2h", 1e9, 10.0)  # idle link again: one-way bandwidth, from its start
    assert later == pytest.approx(10.0 + 1e9 / GH200.d2h_bw)
    assert link.busy_s["h2d"] == pytest.approx(2e9 / GH200.h2d_bw)


def test_stepwork_counts_causal_pairs():
    from oneiros.core import Request, ScheduledSeq, StepPlan

    r = Request(list(range(10)), SamplingParams(max_tokens=4))
    plan = StepPlan("m", [ScheduledSeq(r, 6, 4)])  # chunk of 4 after 6 cached tokens
    w = StepWork.of(plan)
    assert w.tokens == 4 and w.kv_read_tokens == 10 and w.sampled == 1
    assert w.attn_pairs == 7 + 8 + 9 + 10


# ---- streaming ----------------------------------------------------------------------------------
def _stream(hw, n, missing, distance, layer_bytes, layer_s, wait=None) -> PassRun:
    run = PassRun(n, layer_s, layer_bytes, plan_pass(n, missing, distance), wait or {})
    replay([run], HostLink(hw.h2d_bw, hw.d2h_bw, hw.mixed_bw), 0.0)
    return run


def test_streamed_copies_hide_under_enough_compute():
    layer_bytes = 400_000_000
    copy = layer_bytes / GH200.h2d_bw
    hidden = _stream(GH200, 32, (8, 16, 24), 2, layer_bytes, layer_s=copy * 4)
    assert hidden.copies == 5 and hidden.exposed_s == pytest.approx(0.0)
    assert hidden.end == pytest.approx(32 * copy * 4)
    exposed = _stream(GH200, 32, (8, 16, 24), 2, layer_bytes, layer_s=copy / 10)
    assert exposed.exposed_s > 0 and exposed.end > 32 * copy / 10


def test_a_layer_waits_for_its_restore_in_flight():
    run = _stream(GH200, 8, (), 2, 10**8, 1e-3, wait={5: 0.02})
    assert run.exposed_s == pytest.approx(0.02 - 5e-3) and run.end == pytest.approx(0.02 + 3e-3)


def test_two_passes_share_the_link():
    """Two models stream at once: their copies queue on one link, so together they expose more
    than either alone."""
    layer_bytes, n, missing = 10**9, 16, (4, 8, 12)
    layer_s = 0.4 * layer_bytes / GH200.h2d_bw  # alone, the 5 copies just hide
    alone = _stream(GH200, n, missing, 2, layer_bytes, layer_s)
    assert alone.exposed_s == 0.0
    runs = [PassRun(n, layer_s, layer_bytes, plan_pass(n, missing, 2)) for _ in range(2)]
    replay(runs, HostLink(GH200.h2d_bw), 0.0)
    assert all(r.exposed_s > 0 and r.end > alone.end for r in runs)
    assert all(r.copies == alone.copies for r in runs)


@pytest.mark.parametrize("distance", [1, 2])
def test_more_bandwidth_never_exposes_more(distance):
    rng = random.Random(distance)
    for _ in range(50):
        n = rng.randint(4, 40)
        missing = tuple(sorted(rng.sample(range(1, n), rng.randint(1, n - 2))))
        layer_s = rng.uniform(1e-5, 1e-3)
        slow = _stream(replace(GH200, h2d_bw=20e9), n, missing, distance, 10**8, layer_s)
        fast = _stream(replace(GH200, h2d_bw=400e9), n, missing, distance, 10**8, layer_s)
        assert fast.exposed_s <= slow.exposed_s + 1e-12
        assert slow.copies == fast.copies
        assert len(missing) + 1 <= fast.copies <= len(missing) + distance
        frac = exposed_fraction(n, missing, distance, n * layer_s, 10**8 / 20e9)
        assert frac == pytest.approx((slow.steady_end() - n * layer_s) / (n * layer_s))
        # alone on the link, a pass is its compute and its waits
        assert slow.end == pytest.approx(n * layer_s + slow.exposed_s)


def test_a_borrowed_slabs_own_layer_comes_back_after_the_pass():
    """The copies that give borrowed slabs their own layers back run after the pass on the copy
    stream: the pass ends with its last layer, and its next pass (steady_end) is what waits."""
    layer_bytes, n = 10**9, 8
    layer_s = 0.1 * layer_bytes / GH200.h2d_bw  # copies 10x slower than a layer's compute
    run = _stream(GH200, n, (4,), 2, layer_bytes, layer_s)
    assert run.restores and set(run.restores) <= set(range(n))
    assert run.end == pytest.approx(n * layer_s + run.exposed_s)
    assert max(run.restores.values()) > run.end
    assert run.steady_end() > run.end


# ---- profiles -----------------------------------------------------------------------------------
def test_profiles_load_by_name_and_from_json(tmp_path):
    assert load_profile("GH200") is GH200
    path = tmp_path / "p.json"
    path.write_text(replace(GH200, name="mine", mem_eff=0.5).to_json())
    assert load_profile(str(path)).mem_eff == 0.5
    with pytest.raises(ConfigError, match="unknown hardware"):
        load_profile("tpu-v9")
    path.write_text(json.dumps({"name": "x", "bogus": 1}))
    with pytest.raises(ConfigError, match="unknown fields"):
        load_profile(str(path))


# ---- calibration --------------------------------------------------------------------------------
def test_calibration_recovers_the_profile_that_made_the_trace(tmp_path):
    m = _cost(24)
    truth = replace(
        PROFILES["cpu"], compute_eff=0.5, mem_eff=0.25, overlap=1.0, step_overhead_s=3e-3,
        layer_overhead_s=0.0, token_overhead_s=1e-5, seq_overhead_s=2e-3,
        multi_token_overhead_s=20e-3,
    )
    rng = random.Random(0)
    lines = []
    for _ in range(60):
        if rng.random() < 0.5:  # decode
            b = 1 if rng.random() < 0.3 else rng.randint(2, 64)  # one row: a matrix-vector pass
            ctx = [rng.randint(16, 1024) for _ in range(b)]
            p = {"prefill_tokens": 0, "decode_tokens": b, "sampled": b, "attn_pairs": sum(ctx),
                 "context_tokens": sum(ctx), "batch": b}
        else:
            q = rng.randint(16, 2048)
            p = {"prefill_tokens": q, "decode_tokens": 0, "sampled": 1,
                 "attn_pairs": q * (q + 1) // 2, "context_tokens": q, "batch": 1}
        w = StepWork(p["prefill_tokens"] + p["decode_tokens"], p["sampled"], p["attn_pairs"],
                     p["context_tokens"], p["batch"])
        f, nb = flops_bytes(m, w, truth.dtype_bytes)
        dt = compute_time(truth, f, nb) + overhead_time(truth, m.num_layers, w)
        lines.append(json.dumps({"t": 0, "dt": dt, "plans": [{"model": "m", **p}]}))
    path = tmp_path / "steps.jsonl"
    path.write_text("\n".join(lines))
    prof, stats = fit(PROFILES["cpu"], read_steps(path), {"m": m})
    assert stats["rms_relative_error"] < 0.05
    assert prof.compute_eff == pytest.approx(0.5, rel=0.15)
    assert prof.mem_eff == pytest.approx(0.25, rel=0.15)
    assert prof.seq_overhead_s == pytest.approx(2e-3, rel=0.2)
    assert prof.multi_token_overhead_s == pytest.approx(20e-3, rel=0.2)


def test_step_noise_is_the_spread_of_steps_of_one_shape():
    """Three shapes: one seen 4 times with times 1, 1, 1.2, 0.8 (deviations 0, 0, +20%, -20% from
    the median 1.0), one seen 3 times identically, one seen twice (too few: left out); a step that
    streamed layers is left out as the fit leaves it out."""
    def step(dt, batch, ctx=100, h2d=0):
        return {"dt": dt, "plans": [{"model": "m", "batch": batch, "prefill_tokens": 0,
                                     "decode_tokens": batch, "context_tokens": ctx,
                                     "h2d_bytes": h2d}]}
    steps = [step(x, 4) for x in (1.0, 1.0, 1.2, 0.8)] + [step(0.5, 8)] * 3
    steps += [step(0.1, 2), step(0.3, 2), step(9.0, 8, h2d=1)]
    noise = step_noise(steps)
    assert noise["noise_steps"] == 7
    assert noise["noise_rms_relative"] == pytest.approx((2 * 0.2**2 / 7) ** 0.5)
    assert step_noise(steps[-3:]) == {"noise_steps": 0, "noise_rms_relative": None}


def test_calibration_refuses_a_trace_without_enough_steps(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text("{\"t\": 0, \"dt\": 1, \"plans\": []}\n")
    with pytest.raises(ConfigError, match="usable steps"):
        fit(PROFILES["cpu"], read_steps(path), {"m": _cost()})
    path.write_text("not json\n")
    with pytest.raises(ConfigError, match="not a JSON line"):
        read_steps(path)


# ---- the engine in simulation -------------------------------------------------------------------
def _simulate(hardware, policy="oneiros", budget=0.9, n=60, workload_seed=0, **kw):
    # Every prompt repeats one token, so with prefix caching they would all share one prefix:
    # these checks are about memory pressure, which needs each request's KV to be its own.
    kw.setdefault("prefix_caching", False)
    e = LLMEngine(EngineConfig(
        models=C1, executor="sim", hardware=hardware, policy=policy, memory_budget=budget, **kw
    ))
    rng = random.Random(workload_seed)
    for i in range(n):
        e.add_request(
            [100] * rng.randint(200, 2000),
            SamplingParams(max_tokens=rng.randint(50, 400), ignore_eos=True),
            rng.choice(list(C1)),
            arrival_time=i * 0.02,
        )
    lengths = {}
    while e.has_unfinished():
        for o in e.step():
            if o.finished:
                lengths[o.request_id] = len(o.token_ids)
    e.check_integrity()
    preempt = sum(s.counters.preemptions for s in e.store.states.values())
    return e, lengths, preempt


def test_full_size_models_simulate_on_the_meta_device():
    e, lengths, _ = _simulate("gh200")
    assert len(lengths) == 60
    assert e.weights == {}  # accounting only: no weights and no device buffer were made
    assert all(t.model.layers[0] is None for t in e.tenants.values())
    assert e.clock.now() > 0
    remapped = sum(s.counters.remapped_layers for s in e.store.states.values())
    assert remapped > 0  # 96 GB hold the weights with little KV to spare


def test_kv_page_moves_cost_device_copies_before_the_step():
    """A memory-only step with KV compaction advances the clock by its device copies: each
    moved page read and written at the profile's effective memory bandwidth."""
    from oneiros.core import MoveKV, Step
    from oneiros.engine.clock import VirtualClock
    from oneiros.sim.executor import SimExecutor, SimTenant

    page = 2 * 1024 * 1024
    clock = VirtualClock()
    sim = SimExecutor(GH200, clock, {"m": SimTenant(_cost(), 1 << 20, 4096, 100, None, page)})
    step = Step(0.0, memory=[MoveKV("m", (4, 5, 6), (0, 1, 2))])
    assert sim.execute(step) == []
    assert clock.now() == pytest.approx(2 * 3 * page / (GH200.mem_bw * GH200.mem_eff))


def test_step_noise_is_seeded_and_moves_the_clock_around_the_noise_free_run():
    """sim_noise draws each step's compute factor from the config's seed: one seed repeats
    exactly, another gives another run, and the runs scatter around the noise-free one (the
    factor's median is 1) while every request still completes."""
    ends = {}
    for noise, seed in ((0.0, 0), (0.0, 5), (0.1, 1), (0.1, 1), (0.1, 2)):
        e, lengths, _ = _simulate("gh200", n=30, sim_noise=noise, seed=seed)
        assert len(lengths) == 30
        ends.setdefault((noise, seed), []).append(e.clock.now())
    assert ends[0.0, 0] == ends[0.0, 5]  # no noise: the seed changes nothing
    assert ends[0.1, 1][0] == ends[0.1, 1][1]
    assert ends[0.1, 1][0] != ends[0.1, 2][0] != ends[0.0, 0][0]
    for seed in (1, 2):
        assert abs(ends[0.1, seed][0] / ends[0.0, 0][0] - 1) < 0.1
    with pytest.raises(ConfigError, match="sim_noise"):
        EngineConfig(models=C1, executor="sim", hardware="gh200", sim_noise=-0.1)


def test_more_bandwidth_is_never_slower_end_to_end(tmp_path):
    slow, _, _ = _simulate(replace_profile(tmp_path, h2d_bw=25e9, d2h_bw=25e9, mixed_bw=20e9), policy="swap")
    fast, _, _ = _simulate(replace_profile(tmp_path, h2d_bw=400e9, d2h_bw=400e9, mixed_bw=360e9), policy="swap")
    assert fast.clock.now() <= slow.clock.now() * 1.001


def test_more_memory_never_slower_and_enough_memory_never_preempts(tmp_path):
    """Preemption counts are not monotonic in memory under greedy admission (less memory admits
    fewer requests at once: 34 preemptions at 0.75 of a GH200 against 85 at 0.9 on this workload),
    so the sanity checks are: the makespan never grows with memory, and with memory for every
    request's KV at once nothing is preempted."""
    ends = [_simulate("gh200", policy="recompute", budget=b)[0].clock.now() for b in (0.8, 0.9, 1.0)]
    assert ends[0] >= ends[1] >= ends[2]
    _, lengths, preempt = _simulate(replace_profile(tmp_path, memory_bytes=400 * 10**9), policy="recompute")
    assert preempt == 0 and len(lengths) == 60


def test_kv_watermark_is_a_share_of_the_kv_cache_and_cuts_preemptions():
    """vLLM V0's admission watermark: 1% of the KV cache at start-up stays free while requests
    run, so fewer admissions are preempted right after (swap policy, memory short)."""
    e, lengths, without = _simulate("gh200", policy="swap", kv_watermark=0.0)
    w, wlengths, with_wm = _simulate("gh200", policy="swap")  # 0.01, the default
    for t in w.tenants.values():
        assert e.tenants[t.name].scheduler.watermark_blocks == 0
        assert t.scheduler.watermark_blocks > 0
    assert sorted(wlengths.values()) == sorted(lengths.values())  # all finish, full length
    assert 0 < with_wm < without


def replace_profile(tmp_path, **changes) -> str:
    """A GH200 variant as a profile file (the engine takes a name or a path)."""
    path = tmp_path / f"variant{len(list(tmp_path.iterdir()))}.json"
    path.write_text(replace(GH200, name="variant", **changes).to_json())
    return str(path)


def test_every_profile_says_its_host_memory_and_cold_tier():
    for p in PROFILES.values():
        assert p.host_memory_bytes > 0 and 0 < p.cold_bw < p.h2d_bw, p.name
    h200 = load_profile("H200")
    assert (h200.memory_bytes, h200.mem_bw, h200.h2d_bw, h200.d2h_bw) == (141e9, 4.8e12, 55e9, 55e9)
    assert h200.mixed_bw < h200.h2d_bw


def test_models_past_the_host_memory_copy_in_from_the_cold_tier_slower():
    """Host memory for one model's pinned copy: the second is in the cold tier, and the same
    restore of all its layers takes the link h2d_bw / cold_bw times as long."""
    two = {"a": "random:llama-3-8b", "b": "random:llama-3-8b"}
    e = LLMEngine(EngineConfig(models=two, executor="sim", hardware="h200", policy="oneiros",
                               host_memory_budget=20 * 10**9, page_bytes=32 << 20))
    a, b = e.tenants["a"], e.tenants["b"]
    assert not a.cold and b.cold
    remap = e.planner.remap
    hw = load_profile("h200")
    assert remap.copy_s(b) / remap.copy_s(a) == pytest.approx(hw.h2d_bw / hw.cold_bw)
    took = {}
    for t in (a, b):
        layers = list(range(1, t.num_layers))
        e.evict_layers(t.name, layers)
        start = e.clock.now()
        assert e.restore_layers(t.name, layers)
        e.add_request([1, 2, 3], SamplingParams(max_tokens=1, ignore_eos=True), t.name)
        while e.has_unfinished():
            e.step()  # the pass waits for the restores in flight
        took[t.name] = e.clock.now() - start
    assert took["b"] > 3 * took["a"]
    e.check_integrity()


# ---- prefix caching in simulation ---------------------------------------------------------------
def _simulate_prompts(prompt, policy: str, caching: bool, n: int = 40, budget: float = 0.9):
    """n requests of C1 whose prompts come from prompt(i, rng): per request, its token times and
    preemptions; the engine's counters."""
    e = LLMEngine(EngineConfig(models=C1, executor="sim", hardware="gh200", policy=policy,
                               memory_budget=budget, prefix_caching=caching))
    rng = random.Random(1)
    reqs = [
        e.add_request(prompt(i, rng), SamplingParams(max_tokens=rng.randint(50, 400),
                                                     ignore_eos=True),
                      rng.choice(list(C1)), arrival_time=i * 0.02)
        for i in range(n)
    ]
    while e.has_unfinished():
        e.step()
    e.check_integrity()
    times = [(list(r.token_times), r.num_preemptions) for r in reqs]
    return times, {m: s.counters for m, s in e.store.states.items()}


def test_caching_changes_no_simulated_time_when_no_prefix_repeats():
    """Prompts that differ in their first token share no block: with caching on, every token comes
    at the same simulated time as with it off, under memory pressure (layers remapped). (A request
    preempted by recompute or swap may find its own blocks still cached when it comes back: that
    is a hit, and changes the run.)"""
    def prompt(i, rng):
        return [1000 + i] + [100] * rng.randint(200, 2000)

    on, c_on = _simulate_prompts(prompt, "oneiros", True)
    off, c_off = _simulate_prompts(prompt, "oneiros", False)
    assert sum(c.remapped_layers for c in c_off.values()) > 0  # under memory pressure
    assert on == off
    for m in c_on:
        assert c_on[m].prefix_cache_hits == 0 and c_on[m].prefix_cache_queries > 0
        assert c_on[m].prefill_tokens == c_off[m].prefill_tokens


def test_a_shared_prefix_is_priced_as_skipped_prefill():
    """Requests sharing a 1,500-token system prompt: with caching the hits are prefill the cost
    model never charges, so first tokens come sooner."""
    def prompt(i, rng):
        return [100] * 1500 + [1000 + i] * rng.randint(20, 80)

    on, c_on = _simulate_prompts(prompt, "oneiros", True, budget=1.0)
    off, c_off = _simulate_prompts(prompt, "oneiros", False, budget=1.0)
    hits = sum(c.prefix_cache_hits for c in c_on.values())
    assert hits >= (40 - 3) * 1488  # every request but each model's first: 93 blocks of 16
    assert sum(c.prefill_tokens for c in c_on.values()) == sum(
        c.prefill_tokens for c in c_off.values()) - hits
    ttft = [sorted(t[0][0] for t in run) for run in (on, off)]
    assert ttft[0][len(ttft[0]) // 2] < ttft[1][len(ttft[1]) // 2]
