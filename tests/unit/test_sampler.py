"""Sampler on CPU with hand-made logits: no model."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oneiros.engine.sampler import Sampler
from tests.factories import make_request

CPU = torch.device("cpu")
V = 50


def logits_rows(n: int, seed: int = 0, vocab: int = V, scale: float = 3.0) -> torch.Tensor:
    """Random float32 logits without ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale


def req(**params):
    params.setdefault("temperature", 1.0)
    return make_request(2, **params)


def draw(sampler, logits_row, r, n):
    """n tokens for request r from the same logits, one step at a time (its generator advances)."""
    return [sampler.sample(logits_row[None], [r])[0][0] for _ in range(n)]


# ---- greedy and log-probabilities ---------------------------------------------------------------
def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = logits_rows(6)
    reqs = [req(temperature=0.0) for _ in range(6)]
    tokens, lps, top = Sampler(CPU).sample(logits, reqs)
    assert tokens == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits, -1)
    assert lps == pytest.approx(ref[range(6), tokens].tolist(), abs=1e-6)
    assert top is None


@settings(max_examples=20, deadline=None)
@given(
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    top_k=st.sampled_from([0, -1, 1, 5]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]),
    seed=st.integers(0, 1000),
)
def test_logprobs_are_of_the_raw_distribution(temperature, top_k, top_p, seed):
    """Whatever the sampling transform, the reported logprob is log_softmax of the raw logits."""
    logits = logits_rows(4, seed)
    reqs = [req(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed) for _ in range(4)]
    tokens, lps, _ = Sampler(CPU, seed).sample(logits, reqs)
    ref = torch.log_softmax(logits, -1)
    assert lps == pytest.approx(ref[range(4), tokens].tolist(), abs=1e-6)


def test_top_n_logprobs():
    logits = logits_rows(4)
    reqs = [req(logprobs=3), req(logprobs=None), req(logprobs=0), req(logprobs=7)]
    tokens, lps, top = Sampler(CPU).sample(logits, reqs)
    assert top is not None and [len(t) for t in top] == [3, 0, 0, 7]
    ref = torch.log_softmax(logits, -1)
    for row, want in ((0, 3), (3, 7)):
        vals, ids = ref[row].topk(want)
        assert list(top[row]) == ids.tolist()  # best first
        assert list(top[row].values()) == pytest.approx(vals.tolist(), abs=1e-6)
    assert lps == pytest.approx(ref[range(4), tokens].tolist(), abs=1e-6)


def test_logprobs_zero_gets_an_empty_dict_whatever_the_batch():
    """Regression: logprobs=0 used to get no entry alone but {} next to a logprobs>0 request."""
    logits = logits_rows(2)
    alone = Sampler(CPU).sample(logits[:1], [req(logprobs=0)])[2]
    mixed = Sampler(CPU).sample(logits, [req(logprobs=0), req(logprobs=2)])[2]
    assert alone == [{}]
    assert mixed[0] == {} and len(mixed[1]) == 2


def test_more_logprobs_than_the_vocabulary():
    """Regression: topk(20) on a 10-token vocabulary raised 'selected index k out of range'."""
    logits = logits_rows(1, vocab=10)
    _, _, top = Sampler(CPU).sample(logits, [req(logprobs=20)])
    assert len(top[0]) == 10


def test_low_precision_logits():
    logits = logits_rows(3).to(torch.bfloat16)
    tokens, lps, _ = Sampler(CPU).sample(logits, [req(temperature=0.0)] * 3)
    assert tokens == logits.float().argmax(-1).tolist()
    ref = torch.log_softmax(logits.float(), -1)
    assert lps == pytest.approx(ref[range(3), tokens].tolist(), abs=1e-5)


# ---- truncation equals greedy -------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.sampled_from([0.5, 1.0, 3.0]))
def test_top_k_1_and_tiny_top_p_are_greedy(seed, temperature):
    logits = logits_rows(5, seed, scale=1.0)  # flat-ish: plain sampling would often differ
    greedy = logits.argmax(-1).tolist()
    s = Sampler(CPU, seed)
    for params in ({"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5}):
        reqs = [req(temperature=temperature, **params) for _ in range(5)]
        for _ in range(3):
            assert s.sample(logits, reqs)[0] == greedy


@pytest.mark.parametrize("temperature", [1e-40, 1e-12, 1e-6])
def test_temperature_near_zero_is_greedy(temperature):
    """Regression: temperature 1e-40 overflowed logits/T to inf and multinomial raised on NaN."""
    logits = logits_rows(4, scale=10.0)
    reqs = [req(temperature=temperature, top_p=p) for p in (1.0, 0.5, 1.0, 0.9)]
    assert Sampler(CPU).sample(logits, reqs)[0] == logits.argmax(-1).tolist()


def test_top_k_keeps_the_k_best():
    logits = logits_rows(1, 3, scale=0.5)[0]
    allowed = set(logits.topk(4).indices.tolist())
    s = Sampler(CPU, 1)
    r = req(top_k=4, seed=5)
    got = draw(s, logits, r, 300)
    assert set(got) <= allowed
    assert len(set(got)) == 4  # all four are reachable on flat logits


def test_top_p_keeps_the_nucleus():
    logits = logits_rows(1, 4, scale=2.0)[0]
    p = 0.6
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    k = int((cum < p).sum()) + 1  # smallest prefix reaching p
    nucleus = set(order[:k].tolist())
    got = draw(Sampler(CPU), logits, req(top_p=p, seed=9), 300)
    assert set(got) <= nucleus
    assert len(set(got)) == len(nucleus) or len(nucleus) > 6


# ---- seeds ---------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible():
    logits = logits_rows(1, 7, scale=1.0)[0]
    a = draw(Sampler(CPU, 0), logits, req(seed=1234), 20)
    b = draw(Sampler(CPU, 99), logits, req(seed=1234), 20)  # other sampler, other request id
    c = draw(Sampler(CPU, 0), logits, req(seed=4321), 20)
    assert a == b
    assert a != c
    assert len(set(a)) > 1  # it really samples


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    companions=st.lists(
        st.fixed_dictionaries(
            {
                "temperature": st.sampled_from([0.0, 0.7, 1.5]),
                "seed": st.one_of(st.none(), st.integers(0, 100)),
                "top_k": st.sampled_from([0, 3]),
            }
        ),
        max_size=4,
    ),
    position=st.integers(0, 4),
)
def test_seeded_tokens_do_not_depend_on_batch_companions(seed, companions, position):
    logits = logits_rows(1, seed % 1000, scale=1.0)
    alone = draw(Sampler(CPU), logits[0], req(seed=seed), 8)

    s = Sampler(CPU, seed=seed + 1)
    r = req(seed=seed)
    others = [req(**c) for c in companions]
    pos = min(position, len(others))
    got = []
    for _ in range(8):
        batch = others[:pos] + [r] + others[pos:]
        other_rows = logits_rows(len(others), seed % 1000 + 17, scale=1.0)
        rows = torch.cat([other_rows[:pos], logits, other_rows[pos:]])
        tokens = s.sample(rows, batch)[0]
        got.append(tokens[pos])
    assert got == alone


def test_same_seed_in_one_batch_gives_the_same_tokens():
    logits = logits_rows(1, 11, scale=1.0).repeat(3, 1)
    reqs = [req(seed=77), req(seed=77), req(seed=77)]
    s = Sampler(CPU)
    for _ in range(5):
        t = s.sample(logits, reqs)[0]
        assert t[0] == t[1] == t[2]


def test_release_restarts_a_seeded_stream():
    logits = logits_rows(1, 12, scale=1.0)[0]
    s = Sampler(CPU)
    r = req(seed=3)
    first = draw(s, logits, r, 10)
    s.release(r.request_id)
    assert draw(s, logits, r, 10) == first
    s.release("unknown")  # no error


def test_unseeded_sampling_follows_the_engine_seed():
    logits = logits_rows(1, 13, scale=1.0)[0]
    a = draw(Sampler(CPU, 5), logits, req(), 20)
    b = draw(Sampler(CPU, 5), logits, req(), 20)
    assert a == b


# ---- temperature shapes the distribution ---------------------------------------------------------
def _frequencies(logits_row: torch.Tensor, temperature: float, n: int = 2500) -> torch.Tensor:
    reqs = [req(temperature=temperature) for _ in range(n)]
    tokens = Sampler(CPU, 0).sample(logits_row.expand(n, -1), reqs)[0]
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.numel()).float() / n


def test_temperature_changes_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    for t in (0.5, 1.0, 2.0):
        freq = _frequencies(logits, t)
        expect = (logits / t).softmax(-1)
        assert (freq - expect).abs().max() < 0.04, (t, freq, expect)
    cold, hot = _frequencies(logits, 0.5), _frequencies(logits, 2.0)
    assert cold[0] > 0.6 > hot[0]
    assert hot[4] > cold[4]


def test_each_row_gets_its_own_temperature():
    """Rows of one batch are sampled together: each must still use its own temperature."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 2500
    temps = [0.5, 2.0] * n
    reqs = [req(temperature=t) for t in temps]
    tokens = Sampler(CPU, 0).sample(logits.expand(2 * n, -1), reqs)[0]
    for offset, t in ((0, 0.5), (1, 2.0)):
        freq = torch.bincount(torch.tensor(tokens[offset::2]), minlength=5).float() / n
        assert (freq - (logits / t).softmax(-1)).abs().max() < 0.04, (t, freq)


def test_truncation_is_per_row():
    """A companion's top-k does not truncate a row that asked for none, and greedy rows stay
    greedy next to sampled ones."""
    logits = logits_rows(1, 21, scale=0.3)[0]  # flat: an untruncated row reaches many tokens
    best2 = set(logits.topk(2).indices.tolist())
    s = Sampler(CPU, 3)
    reqs = [req(top_k=2), req(), req(temperature=0.0), req(top_p=0.2)]
    seen: list[set[int]] = [set() for _ in reqs]
    for _ in range(200):
        for k, tok in enumerate(s.sample(logits.expand(4, -1), reqs)[0]):
            seen[k].add(tok)
    assert seen[0] <= best2 and len(seen[0]) == 2
    assert len(seen[1] - best2) > 5
    assert seen[2] == {int(logits.argmax())}
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.2).sum()) + 1].tolist())
    assert seen[3] <= nucleus and len(seen[3]) > 1


# ---- penalties, logit bias, allowed tokens, min-p (against a row-at-a-time reference) -----------
def reference_logits(row: torch.Tensor, r) -> torch.Tensor:
    """vLLM's order, one token at a time in plain Python: allowed tokens, bias, repetition,
    frequency, presence."""
    p = r.params
    out = [float(x) for x in row]
    vocab = len(out)
    if p.allowed_token_ids is not None:
        out = [x if t in p.allowed_token_ids else float("-inf") for t, x in enumerate(out)]
    for t, b in p.logit_bias:
        if t < vocab:
            out[t] += b
    gen = r.output_token_ids
    seen = set(gen) | set(r.prompt_token_ids)
    for t in range(vocab):
        if t in seen and p.repetition_penalty != 1.0:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        c = gen.count(t)
        out[t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return torch.tensor(out)


def penalized_request(rng: random.Random, **params):
    r = make_request(rng.randint(1, 6), **params)
    r.prompt_token_ids = [rng.randrange(V) for _ in range(rng.randint(1, 8))]
    r.output_token_ids = [rng.randrange(V) for _ in range(rng.randint(0, 12))]
    return r


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rep=st.sampled_from([1.0, 0.5, 1.3, 2.0]),
    freq=st.sampled_from([0.0, 0.7, -1.5]),
    pres=st.sampled_from([0.0, 1.2, -0.4]),
    nbias=st.integers(0, 4),
    allowed=st.booleans(),
)
def test_process_logits_matches_reference(seed, rep, freq, pres, nbias, allowed):
    rng = random.Random(seed)
    reqs = []
    for k in range(4):
        if k == 3:  # a row without any of it shares the batch and stays untouched
            reqs.append(penalized_request(rng, temperature=0.0))
            continue
        bias = {rng.randrange(V + 5): rng.uniform(-100, 100) for _ in range(nbias)}
        ids = tuple(rng.sample(range(V), 5)) if allowed and k == 1 else None
        reqs.append(penalized_request(
            rng, temperature=0.0, repetition_penalty=rep, frequency_penalty=freq,
            presence_penalty=pres, logit_bias=bias, allowed_token_ids=ids,
        ))
    logits = logits_rows(4, seed)
    got = Sampler(CPU).process_logits(logits.clone(), reqs)
    for i, r in enumerate(reqs):
        assert torch.allclose(got[i], reference_logits(logits[i], r), atol=1e-4, equal_nan=False)
    tokens, lps, _ = Sampler(CPU).sample(logits, reqs)
    assert tokens == [int(reference_logits(logits[i], r).argmax()) for i, r in enumerate(reqs)]
    raw = torch.log_softmax(logits, -1)  # reported logprobs stay those of the raw logits
    assert lps == pytest.approx(raw[range(4), tokens].tolist(), abs=1e-6)


def test_penalties_change_the_greedy_pick():
    logits = torch.zeros(1, V)
    logits[0, 7], logits[0, 9] = 5.0, 4.0
    r = make_request(2, temperature=0.0, frequency_penalty=1.0)
    r.output_token_ids = [7, 7]  # 5 - 2 < 4
    assert Sampler(CPU).sample(logits, [r])[0] == [9]
    r = make_request(2, temperature=0.0, presence_penalty=2.0)
    r.output_token_ids = [7]
    assert Sampler(CPU).sample(logits, [r])[0] == [9]
    r = make_request(2, temperature=0.0, repetition_penalty=2.0)
    r.prompt_token_ids = [7]  # the prompt counts for the repetition penalty: 5 / 2 < 4
    assert Sampler(CPU).sample(logits, [r])[0] == [9]
    r = make_request(2, temperature=0.0, logit_bias={3: 100})
    assert Sampler(CPU).sample(logits, [r])[0] == [3]
    r = make_request(2, temperature=1.0, seed=1, allowed_token_ids=(11, 12))
    assert set(draw(Sampler(CPU), logits[0], r, 30)) <= {11, 12}


def test_min_p_drops_unlikely_tokens():
    logits = torch.full((1, V), -30.0)
    logits[0, :3] = torch.tensor([2.0, 1.9, -1.0])  # p(2) / p(0) = e^-3 ~ 0.05
    r = req(min_p=0.1, seed=3)
    assert set(draw(Sampler(CPU), logits[0], r, 300)) == {0, 1}
    r = req(min_p=0.0, seed=3)
    assert 2 in set(draw(Sampler(CPU), logits[0], r, 300))


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_p", 1.5), ("presence_penalty", 3), ("frequency_penalty", -2.5),
     ("repetition_penalty", 0), ("logit_bias", {1: 101}), ("logit_bias", {-1: 1}),
     ("allowed_token_ids", ()), ("allowed_token_ids", (-3,))],
)
def test_bad_penalty_params_name_the_field(field, value):
    from oneiros.core import InvalidRequestError, SamplingParams

    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field
