"""Prefix caching changes no output: greedy tokens with caching on equal those with caching off, for
random-weight models and SmolLM2, on traffic that shares prefixes every way the cache handles
(a system prompt ending mid-block, a prompt that is a whole prefix of blocks, identical prompts
admitted in one step, conversations whose next turn is the history plus a new message), with and
without memory pressure: cached blocks evicted, requests preempted (recompute, swap) and parameter
layers remapped in the same run.

Greedy decoding of random-weight models meets near-ties (two tokens within 1e-5 in log-probability)
that different batch shapes may break either way, with or without caching; a divergence is accepted
only at such a tie (each run's top-2 holds the other's token, as likely as its own), and outputs
are compared up to it.
"""

from __future__ import annotations

import pytest
import torch

from oneiros import LLM, SamplingParams
from oneiros.memory.weights import weight_pages
from oneiros.models.loader import resolve
from oneiros.models.registry import build_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SPECS = ["random:llama-tiny", "random:opt-tiny"]
PARAMS = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2)
LOGPROB_ATOL = 1e-3  # as in test_token_identity: batch shapes change summation orders
TIE = 1e-4  # two tokens this close in log-probability are a tie


def random_tokens(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def traffic(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Two waves of prompts over block size 8: a system prompt of 37 tokens (4 blocks and 5
    tokens), continued by questions of several lengths, alone, cut at a block boundary (32) and
    mid-block (29), twice the same prompt (siblings), and an unrelated prompt with a follow-up."""
    g = torch.Generator().manual_seed(seed)
    system = random_tokens(g, 37, vocab)
    other = random_tokens(g, 21, vocab)
    q = [random_tokens(g, k, vocab) for k in (3, 11, 16, 9)]
    first = [system + q[0], system + q[1], system + q[2], system, system[:32], other,
             system + q[0]]
    second = [system + q[3], other + random_tokens(g, 4, vocab), system[:29]]
    return first, second


TURNS = (4, 5, 8)  # requests whose conversation goes on: history + answer + a new message


def drive(llm: LLM) -> tuple[list, list[list[int]]]:
    """Wave one, a few steps, wave two while the first decodes, then the next turn of three
    conversations; integrity checked after every step. Returns outputs and prompts, in order."""
    eng = llm.engine
    first, second = traffic(eng.tenant(None).vocab_size)
    reqs, done = [], {}

    def add(prompts):
        for p in prompts:
            reqs.append(eng.add_request(p, PARAMS))

    def run(steps=None):
        k = 0
        while eng.has_unfinished() and (steps is None or k < steps):
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out
            eng.check_integrity()
            k += 1

    add(first)
    run(3)
    add(second)
    run()
    add([
        list(done[reqs[k].request_id].prompt_token_ids)
        + list(done[reqs[k].request_id].token_ids) + [5, 6, 7]
        for k in TURNS
    ])
    run()
    return [done[r.request_id] for r in reqs], [r.prompt_token_ids for r in reqs]


def assert_same_greedy(on, off, what: str) -> None:
    """Equal tokens and close log-probabilities, up to a divergence that is a near-tie."""
    for k, (a, b) in enumerate(zip(on, off, strict=True)):
        if a.prompt_token_ids != b.prompt_token_ids:
            continue  # the next turn of a conversation whose first turn diverged at a tie
        pairs = enumerate(zip(a.token_ids, b.token_ids, strict=False))
        n = next((i for i, (x, y) in pairs if x != y), None)
        if n is None:
            assert len(a.token_ids) == len(b.token_ids), f"{what}: request {k} stopped elsewhere"
        upto = len(a.token_ids) if n is None else n
        diff = max(
            (abs(x - y) for x, y in zip(a.logprobs[:upto], b.logprobs[:upto], strict=True)),
            default=0.0,
        )
        assert diff <= LOGPROB_ATOL, f"{what}: request {k}: logprobs differ by {diff:.2e}"
        if n is None:
            continue
        ta, tb = a.token_ids[n], b.token_ids[n]
        tie = (
            tb in a.top_logprobs[n] and abs(a.top_logprobs[n][tb] - a.logprobs[n]) <= TIE
            and ta in b.top_logprobs[n] and abs(b.top_logprobs[n][ta] - b.logprobs[n]) <= TIE
        )
        assert tie, (
            f"{what}: request {k} ({len(a.prompt_token_ids)} prompt tokens) differs at token {n}"
            f" without a tie\n on  {list(a.token_ids)}\n off {list(b.token_ids)}"
        )


def engine_pair(spec: str, **kw) -> tuple[LLM, LLM]:
    return LLM(spec, prefix_caching=True, **kw), LLM(spec, prefix_caching=False, **kw)


@pytest.mark.parametrize("spec", SPECS)
def test_shared_prefixes_give_the_same_tokens_and_skip_prefill(spec):
    on, off = engine_pair(spec, block_size=8)
    out_on, prompts = drive(on)
    out_off, _ = drive(off)
    assert_same_greedy(out_on, out_off, spec)
    c_on = on.engine.tenant(None).state.counters
    c_off = off.engine.tenant(None).state.counters
    assert c_off.prefix_cache_queries == c_off.prefix_cache_hits == 0
    assert c_on.prefix_cache_queries == sum(len(p) for p in prompts)  # every request, once
    # The system prompt's 4 full blocks for the 5 requests after the first that hold all of it
    # (the sibling admitted in the same step too), and the conversations' history.
    assert c_on.prefix_cache_hits >= 32 * 5 + 3 * 16
    assert c_on.prefill_tokens == c_off.prefill_tokens - c_on.prefix_cache_hits
    assert c_on.decode_tokens == c_off.decode_tokens


# Under oneiros the growth reserve holds back the admissions that would be preempted later; here
# it is off so that the fallback's preemptions run too (with the reserve this workload preempts
# nothing under oneiros).
PRESSURE = [
    ("recompute", {}),
    ("swap", {}),
    ("oneiros", {"remap_fallback": "recompute", "growth_reserve_tokens": 0}),
    ("oneiros", {"remap_fallback": "swap", "growth_reserve_tokens": 0}),
]


@pytest.mark.parametrize("policy,extra", PRESSURE, ids=[
    "recompute", "swap", "oneiros-recompute", "oneiros-swap"])
@pytest.mark.parametrize("spec", SPECS)
def test_eviction_preemption_and_remapping_give_the_same_tokens(spec, policy, extra):
    """Two pages of KV cache (a few requests' worth): cached blocks are evicted, requests are
    preempted, and under policy oneiros layers are remapped and streamed, in one run."""
    page = 64 * 1024
    cfg = resolve(spec).config
    weights = weight_pages(build_model(cfg, torch.float32, torch.device("cpu")), page)
    on, off = engine_pair(
        spec, memory_budget=(weights + 2) * page, page_bytes=page, block_size=8, policy=policy,
        **extra,
    )
    out_on, _ = drive(on)
    out_off, _ = drive(off)
    assert_same_greedy(out_on, out_off, f"{spec} {policy}")
    t = on.engine.tenant(None)
    c = t.state.counters
    assert c.prefix_cache_hits > 0
    assert t.pool.cache.num_evicted > 0
    assert c.preemptions > 0
    if policy == "oneiros":
        assert c.remapped_layers > 0
    if policy == "swap" or extra.get("remap_fallback") == "swap":
        assert c.swap_out_bytes > 0 and c.recomputed_tokens <= c.prefix_cache_hits


# ---- SmolLM2 ------------------------------------------------------------------------------------
SYSTEM = (
    "You are a careful assistant for a railway museum. Answer in one or two sentences, name the "
    "year when you know it, and say so when you do not know."
)
QUESTIONS = [
    "When did the first passenger railway open?",
    "What is a narrow gauge?",
    "Why were steam locomotives painted dark colours?",
    "When did the first passenger railway open?",  # the same conversation again
]


@pytest.mark.slow
def test_smollm2_conversations_give_the_same_tokens(smollm2_llm):
    """Chat conversations sharing a system prompt, repeated ones, and a second turn of each, on a
    small memory budget (cached blocks evicted, requests preempted, layers remapped): the same
    tokens with caching on (the session's engine has it on by default) and off."""
    src = smollm2_llm.engine.tenant(None)
    page = 2 * 1024 * 1024
    budget = (src.residency.total_pages + 4) * page  # 4 pages: 8 blocks of 16 tokens
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2)

    def run(caching: bool) -> tuple[list, LLM]:
        llm = LLM("smollm2", prefix_caching=caching, memory_budget=budget, policy="oneiros")
        first = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
                 for q in QUESTIONS]
        outs = llm.chat(first, params)
        second = [
            conv + [{"role": "assistant", "content": o.text},
                    {"role": "user", "content": "And fifty years later?"}]
            for conv, o in zip(first, outs, strict=True)
        ]
        outs += llm.chat(second, params)
        llm.engine.check_integrity()
        return outs, llm

    on, llm_on = run(True)
    off, _ = run(False)
    assert_same_greedy(on, off, "smollm2")
    c = llm_on.engine.tenant(None).state.counters
    assert c.prefix_cache_hits > 0 and c.preemptions + c.remapped_layers > 0
