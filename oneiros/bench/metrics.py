"""Latency and throughput of a benchmark run, from per-request token timestamps.

Definitions (every time in seconds, on one clock):
  - TTFT of a request: its first token's time minus its arrival time (the scheduled arrival, so
    time spent queued before the engine admits it counts).
  - TBT, three ways (they answer different questions, so every report shows all three):
      tbt      the gaps between consecutive tokens, pooled over all requests (a long request
               weighs more than a short one): vLLM's ITL;
      tpot     each request's mean gap, (last token - first token) / (tokens - 1), one value per
               request: vLLM's TPOT, and the measure the paper's comparison (built on vLLM 0.7.3's
               serving benchmark) is judged on;
      max_gap  each request's worst gap, one value per request: what a preemption stall does to
               the request it hits, which pooled gaps dilute.
    Percentiles use numpy's default linear interpolation.
  - Makespan: from the earliest arrival to the latest token of the run.
  - Throughput: generated tokens / makespan; total throughput also counts prompt tokens.
  - Goodput: see `summarize`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What a run measured of one request. `token_times` has one entry per generated token;
    `output_len` is the number of tokens generated (normally len(token_times)); `finish_reason`
    is the engine's ('length' when the forced output length was reached)."""

    model: str
    arrival: float
    token_times: list[float] = field(default_factory=list)
    prompt_len: int = 0
    output_len: int = 0
    preemptions: int = 0
    finish_reason: str | None = "length"

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tbt(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Mean gap between tokens after the first; None with fewer than two tokens."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    @property
    def max_gap(self) -> float | None:
        """The request's longest gap between tokens; None with fewer than two tokens."""
        gaps = self.tbt
        return max(gaps) if gaps else None

    @property
    def finish_time(self) -> float | None:
        return self.token_times[-1] if self.token_times else None

    @property
    def latency(self) -> float | None:
        """End-to-end latency: last token minus arrival."""
        return self.token_times[-1] - self.arrival if self.token_times else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "arrival": self.arrival,
            "token_times": list(self.token_times),
            "prompt_len": self.prompt_len,
            "output_len": self.output_len,
            "preemptions": self.preemptions,
            "finish_reason": self.finish_reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        return cls(**d)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) of `values`, linear between samples as numpy's; None when
    there are none."""
    x = np.asarray(list(values), dtype=float)
    return float(np.percentile(x, 100 * q)) if x.size else None


def distribution(values: Iterable[float], percentiles: Sequence[int] = PERCENTILES) -> dict:
    """{'count', 'mean', 'p50', 'p90', 'p99', 'max'} of `values` (numpy linear percentiles);
    every statistic is None when there are no values."""
    x = np.asarray(list(values), dtype=float)
    out: dict[str, Any] = {"count": int(x.size)}
    if x.size == 0:
        return out | {"mean": None, **{f"p{q}": None for q in percentiles}, "max": None}
    out["mean"] = float(x.mean())
    for q, v in zip(percentiles, np.percentile(x, percentiles), strict=True):
        out[f"p{q}"] = float(v)
    out["max"] = float(x.max())
    return out


def request_p99_tbt(record: RequestRecord) -> float | None:
    """The P99 (linear) of one request's own gaps; None for a request with fewer than two tokens."""
    gaps = record.tbt
    return float(np.percentile(gaps, 99)) if gaps else None


def meets_slo(
    record: RequestRecord, slo_ttft_s: float | None = None, slo_tbt_s: float | None = None
) -> bool:
    """Whether a request is 'good': it produced at least one token, its TTFT is <= slo_ttft_s
    (when given), and the P99 of its own token gaps is <= slo_tbt_s (when given; a one-token
    request has no gaps and passes)."""
    ttft = record.ttft
    if ttft is None:
        return False
    if slo_ttft_s is not None and ttft > slo_ttft_s:
        return False
    p99 = request_p99_tbt(record)
    return not (slo_tbt_s is not None and p99 is not None and p99 > slo_tbt_s)


def makespan(records: Sequence[RequestRecord]) -> float | None:
    """Earliest arrival to latest token; None when no request produced a token."""
    ends = [r.finish_time for r in records if r.token_times]
    if not ends:
        return None
    return max(ends) - min(r.arrival for r in records)


def _rate(amount: float, duration: float | None) -> float | None:
    return amount / duration if duration else None


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float | None = None,
    slo_ttft_s: float | None = None,
    slo_tbt_s: float | None = None,
) -> dict[str, Any]:
    """Latency distributions, throughput and goodput of a run, overall and per model.

    `duration_s` replaces the makespan as the denominator of every rate (per-model rates always use
    the whole run's duration, so they add up to the overall rates).

    Goodput counts the requests that meet both SLOs (`meets_slo`: TTFT <= slo_ttft_s and the P99 of
    the request's own token gaps <= slo_tbt_s; an SLO left None is not checked): 'requests_per_s' is
    their number, 'tokens_per_s' their generated tokens, each divided by the duration, and
    'fraction' is their share of all requests. Goodput is None when neither SLO is given.
    """
    duration = duration_s if duration_s is not None else makespan(records)
    out = _summary_of(records, duration, slo_ttft_s, slo_tbt_s)
    models = sorted({r.model for r in records})
    out["per_model"] = {
        m: _summary_of([r for r in records if r.model == m], duration, slo_ttft_s, slo_tbt_s)
        for m in models
    }
    return out


def _summary_of(
    records: Sequence[RequestRecord],
    duration: float | None,
    slo_ttft_s: float | None,
    slo_tbt_s: float | None,
) -> dict[str, Any]:
    prompt = sum(r.prompt_len for r in records)
    generated = sum(r.output_len for r in records)
    ttfts = [t for r in records if (t := r.ttft) is not None]
    latencies = [t for r in records if (t := r.latency) is not None]
    return {
        "requests": len(records),
        "completed": sum(1 for r in records if r.token_times),
        "prompt_tokens": prompt,
        "generated_tokens": generated,
        "duration_s": duration,
        "ttft_s": distribution(ttfts),
        "tbt_s": distribution(g for r in records for g in r.tbt),
        "tpot_s": distribution(t for r in records if (t := r.tpot) is not None),
        "max_gap_s": distribution(t for r in records if (t := r.max_gap) is not None),
        "latency_s": distribution(latencies),
        "throughput_tok_s": _rate(generated, duration),
        "total_throughput_tok_s": _rate(prompt + generated, duration),
        "request_throughput_rps": _rate(len(records), duration),
        "goodput": _goodput(records, duration, slo_ttft_s, slo_tbt_s),
        "preemptions": sum(r.preemptions for r in records),
    }


def vllm_fields(records: Sequence[RequestRecord], duration: float | None) -> dict[str, Any]:
    """The run in the field names of `vllm bench serve` results (milliseconds, per second):
    completed, total_input_tokens, total_output_tokens, request/output/total_token throughput,
    and mean/median/std/p90/p99 of TTFT, TPOT (per request: time after the first token over the
    tokens after it), ITL (every gap between tokens) and E2EL (end-to-end latency)."""
    done = [r for r in records if r.token_times]
    prompt = sum(r.prompt_len for r in done)
    generated = sum(r.output_len for r in done)
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": prompt,
        "total_output_tokens": generated,
        "request_throughput": _rate(len(done), duration),
        "output_throughput": _rate(generated, duration),
        "total_token_throughput": _rate(prompt + generated, duration),
    }
    series = {
        "ttft": [r.ttft for r in done],
        "tpot": [(r.latency - r.ttft) / (len(r.token_times) - 1)
                 for r in done if len(r.token_times) > 1],
        "itl": [g for r in done for g in r.tbt],
        "e2el": [r.latency for r in done],
    }
    for name, values in series.items():
        x = np.asarray(values, dtype=float) * 1e3
        empty = x.size == 0
        out[f"mean_{name}_ms"] = None if empty else float(x.mean())
        out[f"median_{name}_ms"] = None if empty else float(np.median(x))
        out[f"std_{name}_ms"] = None if empty else float(x.std())
        for q in (90, 99):
            out[f"p{q}_{name}_ms"] = None if empty else float(np.percentile(x, q))
    return out


def _goodput(
    records: Sequence[RequestRecord],
    duration: float | None,
    slo_ttft_s: float | None,
    slo_tbt_s: float | None,
) -> dict[str, Any] | None:
    if slo_ttft_s is None and slo_tbt_s is None:
        return None
    good = [r for r in records if meets_slo(r, slo_ttft_s, slo_tbt_s)]
    return {
        "slo_ttft_s": slo_ttft_s,
        "slo_tbt_s": slo_tbt_s,
        "requests": len(good),
        "fraction": len(good) / len(records) if records else None,
        "requests_per_s": _rate(len(good), duration),
        "tokens_per_s": _rate(sum(r.output_len for r in good), duration),
    }


# ---- headline metrics ----------------------------------------------------------------------------

# (label, path into a run summary, lower is better). The comparison ratios and the printed table
# use these; a path missing from a summary (e.g. engine counters of an HTTP run) reads as None.
HEADLINE_METRICS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("ttft_p50", ("ttft_s", "p50"), True),
    ("ttft_p90", ("ttft_s", "p90"), True),
    ("ttft_p99", ("ttft_s", "p99"), True),
    ("tbt_p50", ("tbt_s", "p50"), True),
    ("tbt_p90", ("tbt_s", "p90"), True),
    ("tbt_p99", ("tbt_s", "p99"), True),
    ("tpot_p50", ("tpot_s", "p50"), True),
    ("tpot_p99", ("tpot_s", "p99"), True),
    ("max_gap_p99", ("max_gap_s", "p99"), True),
    ("throughput_tok_s", ("throughput_tok_s",), False),
    ("goodput_tok_s", ("goodput", "tokens_per_s"), False),
    ("preemptions", ("engine", "preemptions"), True),
    ("remapped_layers", ("engine", "remapped_layers"), True),
    ("restored_layers", ("engine", "restored_layers"), True),
)


def lookup(summary: dict[str, Any], path: Sequence[str]) -> Any:
    """summary[path[0]][path[1]]..., or None where any step is missing or None."""
    value: Any = summary
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline; None when either is missing or the baseline is 0 (1.0 when both are 0)."""
    if value is None or baseline is None:
        return None
    if baseline == 0:
        return 1.0 if value == 0 else None
    return value / baseline
