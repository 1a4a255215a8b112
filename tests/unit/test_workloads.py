"""Benchmark workloads (`oneiros/bench/workloads.py`): arrival processes, Azure trace parsing,
length distributions, model mixes, whole workloads and the spec parser.

Statistical checks use n = 20000 draws and tolerances several standard errors wide, with fixed
seeds, so they are deterministic and not flaky. Trace tests write small CSV files in the real
trace's format (7 fractional digits, no zone) into tmp_path; the real traces are never copied.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oneiros.bench.workloads import (
    LENGTH_FITS,
    MIXES,
    WorkItem,
    alpaca_lengths,
    as_sessions,
    assign_models,
    build_workload,
    fit_context,
    gamma_arrivals,
    model_bursts,
    normalize_mix,
    parse_spec,
    parse_trace_timestamp,
    poisson_arrivals,
    random_sources,
    read_azure_trace,
    rename_models,
    sample_lengths,
    sharegpt_lengths,
    workload_from_spec,
    workload_summary,
)

N = 20000


# ---- arrival processes ---------------------------------------------------------------------------
def gaps(arrivals: list[float]) -> np.ndarray:
    return np.diff(np.asarray(arrivals))


@pytest.mark.parametrize("rate", [0.5, 2.0, 50.0])
def test_poisson_rate_and_exponential_gaps(rate):
    t = poisson_arrivals(rate, N, seed=0)
    assert len(t) == N and t[0] == 0.0
    assert np.all(gaps(t) >= 0)
    # Empirical rate: (n - 1) arrivals after the first over the span; the SE of a mean of 20000
    # exponential gaps is 0.7%, so 3% is > 4 SE.
    assert (N - 1) / t[-1] == pytest.approx(rate, rel=0.03)
    g = gaps(t)
    assert g.std() / g.mean() == pytest.approx(1.0, abs=0.05)  # exponential: cv = 1


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_rate_and_cv(cv):
    rate = 3.0
    t = gamma_arrivals(rate, cv, N, seed=1)
    g = gaps(t)
    assert len(t) == N and t[0] == 0.0 and np.all(g >= 0)
    # SE of the mean gap is cv/sqrt(n) relative: 2.8% at cv 4; allow 4 SE.
    assert (N - 1) / t[-1] == pytest.approx(rate, rel=max(0.03, 4 * cv / math.sqrt(N)))
    # The sample cv of very skewed gaps (shape 1/16) converges slowly: 15% at cv 4.
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.05 if cv <= 1 else 0.15)


def test_gamma_with_cv_one_is_exponential():
    g = gaps(gamma_arrivals(1.0, 1.0, N, seed=2))
    # Exponential: P(gap > mean) = 1/e.
    assert np.mean(g > g.mean()) == pytest.approx(math.exp(-1), abs=0.02)


def test_bursty_gamma_clusters_arrivals():
    """cv 4: most gaps are far shorter than the mean, a few very long (bursts then pauses)."""
    g = gaps(gamma_arrivals(1.0, 4.0, N, seed=3))
    assert np.median(g) < 0.01 * g.mean()
    assert np.mean(g > g.mean()) < 0.2


@pytest.mark.parametrize(
    "make",
    [lambda s: poisson_arrivals(2.0, 100, s), lambda s: gamma_arrivals(2.0, 3.0, 100, s)],
    ids=["poisson", "gamma"],
)
def test_arrivals_are_deterministic_per_seed(make):
    assert make(7) == make(7)
    assert make(7) != make(8)


def test_arrival_edge_cases():
    assert poisson_arrivals(1.0, 0) == [] and gamma_arrivals(1.0, 2.0, 0) == []
    assert poisson_arrivals(1.0, 1) == [0.0]
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="rate"):
            poisson_arrivals(bad, 10)
    with pytest.raises(ValueError, match="cv"):
        gamma_arrivals(1.0, 0.0, 10)
    with pytest.raises(ValueError, match="n must"):
        poisson_arrivals(1.0, -1)


@settings(max_examples=50, deadline=None)
@given(
    rate=st.floats(0.01, 1000),
    cv=st.floats(0.1, 8),
    n=st.integers(0, 200),
    seed=st.integers(0, 2**32 - 1),
)
def test_arrivals_are_sorted_finite_and_start_at_zero(rate, cv, n, seed):
    for t in (poisson_arrivals(rate, n, seed), gamma_arrivals(rate, cv, n, seed)):
        assert len(t) == n
        assert all(math.isfinite(x) for x in t)
        assert t == sorted(t)
        assert not t or t[0] == 0.0


# ---- Azure trace ---------------------------------------------------------------------------------
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write_trace(tmp_path, rows: list[tuple[str, int, int]], name: str = "trace.csv"):
    path = tmp_path / name
    path.write_text(HEADER + "".join(f"{t},{c},{g}\n" for t, c, g in rows))
    return path


ROWS = [
    ("2023-11-16 18:17:03.9799600", 4808, 10),
    ("2023-11-16 18:17:04.0319600", 3180, 8),
    ("2023-11-16 18:17:04.0781490", 110, 27),
    ("2023-11-16 18:17:05.9799601", 7433, 14),
    ("2023-11-16 18:17:13.9799600", 0, 3),  # a zero count becomes 1
]


def test_trace_timestamps_keep_every_digit():
    a = parse_trace_timestamp("2023-11-16 18:17:03.9799600")
    b = parse_trace_timestamp("2023-11-16 18:17:05.9799601")
    assert b - a == 2_000_000_100  # nanoseconds: the 7th fractional digit is 100 ns
    assert parse_trace_timestamp("2023-11-16 18:17:03") == a - 979_960_000
    # A zone and ISO 'T' (the 2024 trace's format) are read too; without a zone, UTC.
    assert parse_trace_timestamp("2023-11-16T18:17:03.97996+00:00") == a
    assert parse_trace_timestamp("2023-11-16 19:17:03.97996+01:00") == a
    with pytest.raises(ValueError, match="timestamp"):
        parse_trace_timestamp("16/11/2023 18:17")


def test_read_trace_relative_arrivals_and_lengths(tmp_path):
    rows = read_azure_trace(write_trace(tmp_path, ROWS))
    assert [r.arrival_s for r in rows] == pytest.approx([0.0, 0.052, 0.098189, 2.0000001, 10.0])
    assert [(r.prompt_len, r.output_len) for r in rows] == [
        (4808, 10), (3180, 8), (110, 27), (7433, 14), (1, 3)
    ]


def test_read_trace_scale_cap_and_start(tmp_path):
    path = write_trace(tmp_path, ROWS)
    fast = read_azure_trace(path, time_scale=2.0)
    assert [r.arrival_s for r in fast] == pytest.approx([0.0, 0.026, 0.0490945, 1.00000005, 5.0])
    assert len(read_azure_trace(path, max_requests=2)) == 2
    assert read_azure_trace(path, max_requests=0) == []
    # start_s skips trace seconds after the first row; arrivals restart at the first kept row.
    late = read_azure_trace(path, start_s=1.0, time_scale=10.0)
    assert [r.prompt_len for r in late] == [7433, 1]
    assert [r.arrival_s for r in late] == pytest.approx([0.0, 0.79999999])
    assert read_azure_trace(path, start_s=100.0) == []


def test_read_trace_sorts_unsorted_rows(tmp_path):
    path = write_trace(tmp_path, [ROWS[2], ROWS[0], ROWS[1]])
    rows = read_azure_trace(path)
    assert [r.prompt_len for r in rows] == [4808, 3180, 110]
    assert rows[0].arrival_s == 0.0


def test_read_trace_errors_name_the_problem(tmp_path):
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("time,ctx,gen\n1,2,3\n")
    with pytest.raises(ValueError, match="missing column.*TIMESTAMP"):
        read_azure_trace(bad_header)
    bad_row = write_trace(tmp_path, [ROWS[0], ("2023-11-16 18:17:04.0", "many", 3)], "r.csv")
    with pytest.raises(ValueError, match="line 3"):
        read_azure_trace(bad_row)
    with pytest.raises(ValueError, match="time_scale"):
        read_azure_trace(bad_row, time_scale=0)
    empty = tmp_path / "e.csv"
    empty.write_text(HEADER)
    assert read_azure_trace(empty) == []


# ---- lengths -------------------------------------------------------------------------------------
DOCUMENTED_MEANS = {"sharegpt": (161.31, 337.99), "alpaca": (19.31, 58.45)}  # docs/workloads.md


@pytest.mark.parametrize("name", ["sharegpt", "alpaca"])
def test_length_means_match_documented_values(name):
    pairs = np.array(sample_lengths(name, N, seed=0, max_len=10**9))
    want_prompt, want_output = DOCUMENTED_MEANS[name]
    assert [f.mean for f in LENGTH_FITS[name]] == [want_prompt, want_output]
    # Log-normal with sigma <= 1: SE of the mean <= 1.31/sqrt(n) = 0.9%; allow 4%.
    assert pairs[:, 0].mean() == pytest.approx(want_prompt, rel=0.04)
    assert pairs[:, 1].mean() == pytest.approx(want_output, rel=0.04)
    # Long-tailed: the median is below the mean.
    assert np.median(pairs[:, 0]) < want_prompt and np.median(pairs[:, 1]) < want_output


def test_default_clipping_keeps_means_close():
    """The default max_len (2048) trims only the far tail."""
    s = np.array(sharegpt_lengths(N, seed=1))
    assert s.max() <= 2048
    assert s[:, 1].mean() == pytest.approx(337.99, rel=0.05)
    a = np.array(alpaca_lengths(N, seed=1))
    assert a[:, 0].mean() == pytest.approx(19.31, rel=0.04)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(["sharegpt", "alpaca"]),
    n=st.integers(0, 300),
    max_len=st.integers(1, 64),
    seed=st.integers(0, 10**6),
)
def test_lengths_are_clipped_integers(name, n, max_len, seed):
    pairs = sample_lengths(name, n, seed, max_len)
    assert len(pairs) == n
    for p, o in pairs:
        assert isinstance(p, int) and isinstance(o, int)
        assert 1 <= p <= max_len and 1 <= o <= max_len


def test_clipping_hits_both_bounds():
    pairs = np.array(sharegpt_lengths(2000, seed=0, max_len=50))
    assert pairs.max() == 50 and (pairs == 50).mean() > 0.5  # most ShareGPT outputs exceed 50
    assert pairs.min() >= 1
    assert sharegpt_lengths(100, seed=4) == sharegpt_lengths(100, seed=4)
    assert sharegpt_lengths(100, seed=4) != sharegpt_lengths(100, seed=5)
    with pytest.raises(ValueError, match="unknown length distribution"):
        sample_lengths("dolly", 10)


@given(p=st.integers(1, 5000), o=st.integers(1, 5000), m=st.integers(2, 4096))
def test_fit_context(p, o, m):
    fp, fo = fit_context(p, o, m)
    assert fp >= 1 and fo >= 1 and fp + fo <= m
    assert fp <= p and fo <= o
    if p + o <= m:
        assert (fp, fo) == (p, o)
    elif o <= m - 1:
        assert fo == o  # the output is kept when it fits with one prompt token


# ---- model mixes ---------------------------------------------------------------------------------
def test_mixes_are_the_papers_and_normalise():
    assert MIXES["c1"] == {"opt-13b": 0.35, "llama-2-13b": 0.35, "llama-3-8b": 0.20}
    assert MIXES["c2"] == {"opt-30b": 0.65, "opt-6.7b": 0.15}
    c2 = normalize_mix("c2")
    assert c2 == pytest.approx({"opt-30b": 0.8125, "opt-6.7b": 0.1875})
    assert sum(normalize_mix("C1").values()) == pytest.approx(1.0)
    for bad in ({}, {"a": 0.0}, {"a": -1.0}, "c9"):
        with pytest.raises(ValueError):
            normalize_mix(bad)


@pytest.mark.parametrize("mix", ["c1", "c2", {"a": 1, "b": 3}])
def test_assign_models_proportions(mix):
    names = assign_models(N, mix, seed=0)
    want = normalize_mix(mix)
    assert set(names) == set(want)
    for m, p in want.items():
        # Binomial SE <= 0.35%; allow 1.5 percentage points.
        assert names.count(m) / N == pytest.approx(p, abs=0.015)
    assert assign_models(50, mix, seed=1) == assign_models(50, mix, seed=1)


def test_sources_and_renaming():
    assert random_sources(MIXES["c1"]) == {
        "opt-13b": "random:opt-13b",
        "llama-2-13b": "random:llama-2-13b",
        "llama-3-8b": "random:llama-3-8b",
    }
    w = [WorkItem(0.0, "opt-13b", 3, 4), WorkItem(1.0, "x", 5, 6)]
    renamed = rename_models(w, {"opt-13b": "a"})
    assert renamed == [WorkItem(0.0, "a", 3, 4), WorkItem(1.0, "x", 5, 6)]


# ---- whole workloads -----------------------------------------------------------------------------
def test_work_item_validates():
    with pytest.raises(ValueError):
        WorkItem(-1.0, "a", 1, 1)
    with pytest.raises(ValueError):
        WorkItem(0.0, "a", 0, 1)
    with pytest.raises(ValueError):
        WorkItem(math.nan, "a", 1, 1)


def test_build_workload_pairs_sorts_and_fits():
    arrivals = [2.0, 0.0, 1.0]
    lengths = [(10, 5), (20, 6), (900, 700)]
    w = build_workload(arrivals, lengths, {"a": 1.0}, seed=0, max_total=512)
    assert [x.arrival_s for x in w] == [0.0, 1.0, 2.0]
    assert [(x.prompt_len, x.output_len) for x in w] == [(20, 6), (1, 511), (10, 5)]
    assert {x.model for x in w} == {"a"}
    with pytest.raises(ValueError, match="2 length pairs"):
        build_workload(arrivals, lengths[:2])


def test_workload_summary():
    w = [WorkItem(0.0, "a", 10, 4), WorkItem(2.0, "b", 30, 8), WorkItem(4.0, "a", 20, 6)]
    s = workload_summary(w)
    assert s["requests"] == 3 and s["arrival_span_s"] == 4.0 and s["rate_rps"] == 0.5
    assert s["mean_prompt_len"] == 20 and s["mean_output_len"] == 6 and s["max_total_len"] == 38
    assert s["per_model"] == {"a": 2, "b": 1}
    assert workload_summary([]) == {"requests": 0}


# ---- specs ---------------------------------------------------------------------------------------
def test_poisson_spec_builds_the_same_workload_as_the_functions():
    w = workload_from_spec("poisson:rate=2,n=100,lengths=sharegpt,mix=c1,seed=0")
    assert len(w) == 100
    assert [x.arrival_s for x in w] == poisson_arrivals(2.0, 100, 0)
    assert [(x.prompt_len, x.output_len) for x in w] == sharegpt_lengths(100, 0)
    assert [x.model for x in w] == assign_models(100, "c1", 0)
    assert w == workload_from_spec({"kind": "poisson", "rate": 2, "n": 100, "lengths": "sharegpt"})


def test_gamma_spec_and_defaults():
    w = workload_from_spec("gamma:rate=2,cv=4,n=100,lengths=alpaca")
    assert [x.arrival_s for x in w] == gamma_arrivals(2.0, 4.0, 100, 0)
    assert [(x.prompt_len, x.output_len) for x in w] == alpaca_lengths(100, 0)
    assert {x.model for x in w} <= set(MIXES["c1"])


def test_model_bursts_give_each_model_its_own_process():
    """Each model's arrivals are a Gamma process of its share of the rate: its own count (as
    assign_models draws it), its own rate and cv, and its own pauses (with cv = 4 a model is
    often without requests while the other has a burst, which one shared process rarely shows)."""
    mix = {"a": 3, "b": 1}
    arrivals, models = model_bursts(8.0, 4.0, N, mix, seed=5)
    assert sorted(models) == sorted(assign_models(N, mix, 5))
    for name, share in (("a", 0.75), ("b", 0.25)):
        t = np.array([x for x, m in zip(arrivals, models, strict=True) if m == name])
        g = np.diff(t)
        assert t[0] == 0 and (g >= 0).all()
        assert len(t) / t[-1] == pytest.approx(8.0 * share, rel=0.1)
        assert g.std() / g.mean() == pytest.approx(4.0, rel=0.2)
    shared = workload_from_spec(f"gamma:rate=8,cv=4,n={N},mix=a:3+b:1,seed=5")
    own = workload_from_spec(f"bursts:rate=8,cv=4,n={N},mix=a:3+b:1,seed=5")
    assert [x.arrival_s for x in own] == sorted(arrivals)
    assert [x.arrival_s for x in own] != [x.arrival_s for x in shared]

    def longest_pause(w, name):
        t = [0.0, *[x.arrival_s for x in w if x.model == name], w[-1].arrival_s]
        return max(np.diff(t)) / w[-1].arrival_s

    # b's longest time without a request, as a share of the run: far longer with its own process
    assert longest_pause(own, "b") > 3 * longest_pause(shared, "b")
    with pytest.raises(ValueError, match="cv"):
        workload_from_spec("bursts:rate=1,cv=0,n=10")


def test_spec_with_tenant_mix_fixed_lengths_and_fit():
    w = workload_from_spec(
        "poisson:rate=5,n=200,mix=a:3+b:1,lengths=fixed,prompt_len=400,output_len=300,max_total=512"
    )
    assert {(x.prompt_len, x.output_len) for x in w} == {(212, 300)}
    share = sum(x.model == "a" for x in w) / len(w)
    assert 0.6 < share < 0.9
    w = workload_from_spec("poisson:rate=5,n=10,mix=a+b,max_len=16")
    assert all(x.prompt_len <= 16 and x.output_len <= 16 for x in w)
    # One name that is not a known mix is a single tenant (the runner refuses unknown tenants).
    assert {x.model for x in workload_from_spec("poisson:rate=5,n=10,mix=solo")} == {"solo"}


def test_azure_spec(tmp_path):
    path = write_trace(tmp_path, ROWS)
    w = workload_from_spec(f"azure:path={path},scale=10,n=3,mix=c1")
    assert [x.arrival_s for x in w] == pytest.approx([0.0, 0.0052, 0.0098189])
    assert [(x.prompt_len, x.output_len) for x in w] == [(4808, 10), (3180, 8), (110, 27)]
    clipped = workload_from_spec(f"azure:path={path},max_len=1000,start=1")
    assert [(x.prompt_len, x.output_len) for x in clipped] == [(1000, 14), (1, 3)]
    resampled = workload_from_spec({"kind": "azure", "path": str(path), "lengths": "alpaca"})
    assert [(x.prompt_len, x.output_len) for x in resampled] == alpaca_lengths(5, 0)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("poisson:rate=2,n=10,burst=3", "burst"),  # unknown key
        ("poisson:n=10", "rate"),  # missing key
        ("gamma:rate=2,n=10", "cv"),
        ("azure:n=10", "path"),
        ("poisson:rate=fast,n=10", "rate"),  # not a number
        ("poisson:rate=-2,n=10", "rate"),
        ("poisson:rate=2,n=1.5", "n"),
        ("poisson:rate=2,n=10,seed=x", "seed"),
        ("poisson:rate=2,n=10,max_len=0", "max_len"),
        ("poisson:rate=2,n=10,mix=a+", "mix"),  # empty tenant name
        ("poisson:rate=2,n=10,mix=a:-1", "mix"),
        ("poisson:rate=2,n=10,mix=a:x+b", "mix"),
        ("poisson:rate=2,n=10,lengths=dolly", "lengths"),
        ("poisson:rate=2,n=10,lengths=trace", "lengths"),
        ("poisson:rate=2,n=10,lengths=fixed,prompt_len=5", "output_len"),
        ("poisson:rate=2,n=10,prompt_len=5", "prompt_len"),
        ("poisson:rate=2,rate=3,n=10", "rate"),  # twice
        ("gamma:rate=2,cv=0,n=10", "cv"),
    ],
)
def test_bad_specs_name_the_key(spec, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        workload_from_spec(spec)


def test_bad_spec_shapes():
    with pytest.raises(ValueError, match="'uniform'"):
        parse_spec("uniform:rate=2")
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("poisson:rate=2,n")
    with pytest.raises(ValueError, match="'None'|None"):
        parse_spec({"rate": 2})
    assert parse_spec({"kind": "gamma", "rate": 2, "cv": 1.5, "n": 4.0}) == {
        "kind": "gamma", "rate": 2.0, "cv": 1.5, "n": 4
    }


def test_sessions_chain_consecutive_requests_of_each_model():
    items = [WorkItem(float(k), m, 5, 3) for k, m in enumerate("aabab" "aa")]
    out = as_sessions(items, turns=2)
    # a: 0, 1 | 3, 5 | 6 ; b: 2, 4
    assert [w.follows for w in out] == [None, 0, None, None, 2, 3, None]
    assert [(w.arrival_s, w.prompt_len) for w in out] == [(w.arrival_s, 5) for w in items]
    assert all(w.follows is None for w in as_sessions(items, turns=1))
    with pytest.raises(ValueError, match="turns"):
        as_sessions(items, turns=0)
