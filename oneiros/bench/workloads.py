"""Benchmark workloads: when requests arrive, for which model, and how long they are.

A workload is a list of `WorkItem`s sorted by arrival time. It is built from three independent
parts, each seeded, so that the same spec always gives the same requests and every policy in a
comparison sees exactly the same load:

  - arrivals: a Poisson process, a Gamma renewal process (bursty), or an Azure LLM inference trace;
  - lengths: prompt and output token counts, from parametric fits of ShareGPT and Alpaca, from the
    trace itself, or fixed;
  - models: each request goes to a tenant drawn from a mix (e.g. the paper's C1 and C2).

Model names in a mix are *tenant names*; mapping them to model sources (`random:llama-3-8b`, a
checkpoint directory, ...) is the caller's business (`random_sources`, `rename_models`).
docs/workloads.md documents the distributions, their parameters and where those come from.
"""

from __future__ import annotations

import csv
import math
import re
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# ---- work items ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One request of a workload: sent `arrival_s` seconds after the run starts, to tenant `model`,
    with a prompt of `prompt_len` tokens and exactly `output_len` generated tokens (EOS ignored).

    A later turn of a conversation names the workload index of the turn before it (`follows`): it
    is sent once that turn has finished (at `arrival_s` or then, whichever is later), and its
    prompt is that turn's prompt and output followed by its own `prompt_len` new tokens."""

    arrival_s: float
    model: str
    prompt_len: int
    output_len: int
    follows: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ValueError(f"arrival_s must be a finite time >= 0, got {self.arrival_s}")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(
                f"prompt_len and output_len must be >= 1, got {self.prompt_len}, {self.output_len}"
            )


# ---- seeds ---------------------------------------------------------------------------------------


def _rng(seed: int, stream: str = "") -> np.random.Generator:
    """A generator for one named stream of one seed: arrivals, lengths and models of a workload
    built from one seed are independent of each other, and each is reproducible on its own."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(stream.encode())])


# ---- arrival processes ---------------------------------------------------------------------------


def _check_process(rate: float, n: int) -> None:
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate!r}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")


def _renewal(gaps: np.ndarray) -> list[float]:
    """Arrival times of a renewal process that starts with an arrival at 0: the first request needs
    no idle wait, and the empirical rate is (n - 1) / last arrival."""
    return [0.0, *np.cumsum(gaps).tolist()]


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """n arrival times (seconds, first at 0) of a Poisson process of `rate` requests/s:
    independent exponential gaps of mean 1/rate."""
    _check_process(rate, n)
    if n == 0:
        return []
    return _renewal(_rng(seed, "poisson").exponential(1.0 / rate, n - 1))


def gamma_arrivals(
    rate: float, cv: float, n: int, seed: int = 0, stream: str = "gamma"
) -> list[float]:
    """n arrival times (seconds, first at 0) whose gaps are Gamma distributed with mean 1/rate and
    coefficient of variation `cv` (shape 1/cv^2, scale cv^2/rate). cv = 1 is a Poisson process;
    cv > 1 is bursty (clusters of arrivals separated by long pauses), cv < 1 more regular."""
    _check_process(rate, n)
    if not (isinstance(cv, (int, float)) and math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be a positive number, got {cv!r}")
    if n == 0:
        return []
    shape = 1.0 / cv**2
    return _renewal(_rng(seed, stream).gamma(shape, 1.0 / (rate * shape), n - 1))


def model_bursts(
    rate: float, cv: float, n: int, mix: Mapping[str, float] | str, seed: int = 0
) -> tuple[list[float], list[str]]:
    """Arrival times and tenants of n requests where each model of the mix has its own Gamma
    process (its share of `rate`, the same `cv`): with cv > 1 one model's burst meets the others'
    pauses, so models go without work while others run, which one shared process with models
    drawn per request rarely does. The count per model is drawn as `assign_models` draws it."""
    shares = normalize_mix(mix)
    counts = Counter(assign_models(n, shares, seed))
    arrivals: list[float] = []
    models: list[str] = []
    for name, share in shares.items():
        if counts[name]:  # drawn at least once: its share is positive
            arrivals += gamma_arrivals(rate * share, cv, counts[name], seed, f"gamma/{name}")
            models += [name] * counts[name]
    return arrivals, models


# ---- the Azure LLM inference trace ---------------------------------------------------------------


class TraceRow(NamedTuple):
    """One kept row of a trace: arrival (seconds after the first kept row, already scaled) and the
    recorded token counts."""

    arrival_s: float
    prompt_len: int
    output_len: int


_TIMESTAMP = re.compile(
    r"(?P<base>\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})"
    r"(?:\.(?P<frac>\d+))?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?"
)
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def parse_trace_timestamp(text: str) -> int:
    """Nanoseconds since the epoch of a trace timestamp such as '2023-11-16 18:17:03.9799600' (the
    2023 trace: 7 fractional digits, no zone) or '2024-05-10 00:00:00.009930+00:00'. Timestamps
    without a zone are read as UTC; only differences matter. An integer, so that the 100 ns digit
    survives (a float of epoch seconds, or datetime's microseconds, would lose it)."""
    m = _TIMESTAMP.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"cannot read {text!r} as a trace timestamp (YYYY-MM-DD HH:MM:SS[.f])")
    tz = m["tz"] or "+00:00"
    base = datetime.fromisoformat(m["base"].replace("T", " ") + ("+00:00" if tz == "Z" else tz))
    frac_ns = int((m["frac"] or "0")[:9].ljust(9, "0"))
    return int(base.timestamp()) * 1_000_000_000 + frac_ns


def read_azure_trace(
    path: str | Path,
    time_scale: float = 1.0,
    max_requests: int | None = None,
    start_s: float = 0.0,
) -> list[TraceRow]:
    """Read an Azure LLM inference trace CSV (columns TIMESTAMP, ContextTokens, GeneratedTokens).

    Rows earlier than `start_s` trace seconds after the first row are skipped; arrivals are
    relative to the first row kept and divided by `time_scale` (2 replays the trace twice as fast);
    at most `max_requests` rows are kept. Rows are sorted by time. Token counts below 1 become 1
    (a request needs a prompt token and produces at least one token)."""
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale must be positive, got {time_scale}")
    if max_requests is not None and max_requests < 0:
        raise ValueError(f"max_requests must be >= 0, got {max_requests}")
    if not (math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    rows = _read_trace_rows(Path(path))
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])
    first = rows[0][0] + round(start_s * 1e9)
    kept = [r for r in rows if r[0] >= first]
    if max_requests is not None:
        kept = kept[:max_requests]
    if not kept:
        return []
    t0 = kept[0][0]
    return [TraceRow((t - t0) / 1e9 / time_scale, max(1, p), max(1, o)) for t, p, o in kept]


def _read_trace_rows(path: Path) -> list[tuple[int, int, int]]:
    """(epoch nanoseconds, context tokens, generated tokens) of every data row, with the line number
    of anything unreadable in the error."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in AZURE_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: not an Azure LLM inference trace: missing column(s) {', '.join(missing)} "
                f"(found {', '.join(header) or 'no header'})"
            )
        reader.fieldnames = header
        rows = []
        for line, rec in enumerate(reader, start=2):
            try:
                rows.append(
                    (
                        parse_trace_timestamp(rec["TIMESTAMP"]),
                        int(rec["ContextTokens"]),
                        int(rec["GeneratedTokens"]),
                    )
                )
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}, line {line}: {e}") from None
    return rows


# ---- length distributions ------------------------------------------------------------------------


@dataclass(frozen=True)
class LogNormalLengths:
    """Token counts ~ round(LogNormal) with the given mean and log-space standard deviation `sigma`
    (mu = ln(mean) - sigma^2 / 2), clipped to [1, max_len]. `source` says where the mean is from."""

    mean: float
    sigma: float
    source: str

    @property
    def mu(self) -> float:
        return math.log(self.mean) - self.sigma**2 / 2

    def sample(self, rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
        x = np.rint(rng.lognormal(self.mu, self.sigma, n))
        return np.clip(x, 1, max_len).astype(np.int64)


_VLLM = "Kwon et al., vLLM/PagedAttention, SOSP 2023, Sec. 6.1 and Fig. 11"

# Means: the vLLM paper's statistics of the datasets it served. Sigmas: our choice (the papers
# publish means and histograms, not dispersions); see docs/workloads.md.
LENGTH_FITS: dict[str, tuple[LogNormalLengths, LogNormalLengths]] = {
    "sharegpt": (
        LogNormalLengths(161.31, 1.0, _VLLM),  # prompt
        LogNormalLengths(337.99, 0.9, _VLLM),  # output
    ),
    "alpaca": (
        LogNormalLengths(19.31, 0.6, _VLLM),
        LogNormalLengths(58.45, 0.9, _VLLM),
    ),
}
DEFAULT_MAX_LEN = 2048  # a 2048-token context (OPT) fits any prompt or output drawn alone


def sample_lengths(
    name: str, n: int, seed: int = 0, max_len: int = DEFAULT_MAX_LEN
) -> list[tuple[int, int]]:
    """n (prompt_len, output_len) pairs from the fit `name` in LENGTH_FITS, each clipped to
    [1, max_len]; prompt and output are drawn independently."""
    if name not in LENGTH_FITS:
        raise ValueError(f"unknown length distribution {name!r} (known: {', '.join(LENGTH_FITS)})")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    prompt_fit, output_fit = LENGTH_FITS[name]
    rng = _rng(seed, f"lengths/{name}")
    prompts = prompt_fit.sample(rng, n, max_len)
    outputs = output_fit.sample(rng, n, max_len)
    return list(zip(prompts.tolist(), outputs.tolist(), strict=True))


def sharegpt_lengths(
    n: int, seed: int = 0, max_len: int = DEFAULT_MAX_LEN
) -> list[tuple[int, int]]:
    """ShareGPT-like (prompt_len, output_len) pairs: conversations, long-tailed, mean about 161
    prompt and 338 output tokens before clipping."""
    return sample_lengths("sharegpt", n, seed, max_len)


def alpaca_lengths(n: int, seed: int = 0, max_len: int = DEFAULT_MAX_LEN) -> list[tuple[int, int]]:
    """Alpaca-like (prompt_len, output_len) pairs: short instructions, mean about 19 prompt and 58
    output tokens before clipping."""
    return sample_lengths("alpaca", n, seed, max_len)


def as_sessions(workload: Sequence[WorkItem], turns: int) -> list[WorkItem]:
    """Group a workload into conversations of `turns` turns: consecutive requests to the same model
    form one, each turn after the first following the one before it (its prompt_len becomes the
    length of the new message). Requests keep their order and arrival times."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    out: list[WorkItem] = []
    last: dict[str, tuple[int, int]] = {}  # model -> (index of its open session's last turn, turns)
    for k, w in enumerate(workload):
        prev, n = last.get(w.model, (None, turns))
        if n == turns:
            prev, n = None, 0
        out.append(replace(w, follows=prev))
        last[w.model] = (k, n + 1)
    return out


def fit_context(prompt_len: int, output_len: int, max_total: int) -> tuple[int, int]:
    """Shorten a request to fit a context window of `max_total` tokens (prompt + output). The
    output (the decode work the workload is about) is kept when it can be; the prompt gives way
    first, down to one token, then the output."""
    if max_total < 2:
        raise ValueError(f"max_total must be >= 2 (a prompt and an output token), got {max_total}")
    output_len = min(output_len, max_total - 1)
    prompt_len = min(prompt_len, max_total - output_len)
    return prompt_len, output_len


# ---- model mixes ---------------------------------------------------------------------------------

# The paper's request shares per model. They do not sum to 1 (C1: 0.90, C2: 0.80); assign_models
# normalises them, so C1 is 38.9% / 38.9% / 22.2% and C2 is 81.25% / 18.75%.
MIXES: dict[str, dict[str, float]] = {
    "c1": {"opt-13b": 0.35, "llama-2-13b": 0.35, "llama-3-8b": 0.20},
    "c2": {"opt-30b": 0.65, "opt-6.7b": 0.15},
}


def normalize_mix(mix: Mapping[str, float] | str) -> dict[str, float]:
    """A mix by name (a key of MIXES) or as {tenant: weight}, with weights scaled to sum to 1."""
    if isinstance(mix, str):
        if mix.lower() not in MIXES:
            raise ValueError(f"unknown model mix {mix!r} (known: {', '.join(MIXES)})")
        mix = MIXES[mix.lower()]
    if not mix:
        raise ValueError("a model mix needs at least one model")
    for name, w in mix.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"the weight of {name!r} in the mix must be >= 0, got {w!r}")
    total = float(sum(mix.values()))
    if total <= 0:
        raise ValueError("the weights of a model mix must not all be zero")
    return {name: w / total for name, w in mix.items()}


def assign_models(n: int, mix: Mapping[str, float] | str, seed: int = 0) -> list[str]:
    """n tenant names drawn independently with the mix's (normalised) probabilities."""
    probs = normalize_mix(mix)
    names = list(probs)
    picks = _rng(seed, "models").choice(len(names), size=n, p=list(probs.values()))
    return [names[i] for i in picks.tolist()]


def random_sources(models: Sequence[str] | Mapping[str, Any]) -> dict[str, str]:
    """{tenant: 'random:<tenant>'}: random weights with the shipped geometry of the same name
    (oneiros/models/configs), e.g. for a C1 mix on a GPU without the checkpoints."""
    return {m: f"random:{m}" for m in models}


def rename_models(workload: Sequence[WorkItem], mapping: Mapping[str, str]) -> list[WorkItem]:
    """The workload with tenant names replaced through `mapping` (names not in it are kept), e.g. to
    send the C1 mix to an engine whose tenants are called a, b and c."""
    return [
        WorkItem(w.arrival_s, mapping.get(w.model, w.model), w.prompt_len, w.output_len)
        for w in workload
    ]


# ---- whole workloads -----------------------------------------------------------------------------


def build_workload(
    arrivals: Sequence[float],
    lengths: Sequence[tuple[int, int]],
    mix: Mapping[str, float] | str = "c1",
    seed: int = 0,
    max_total: int | None = None,
    models: Sequence[str] | None = None,
) -> list[WorkItem]:
    """Pair the k-th arrival with the k-th (prompt_len, output_len) and a tenant drawn from `mix`
    (or the k-th of `models`);
    shorten requests to `max_total` tokens (`fit_context`) when given; sort by arrival (stable)."""
    if len(arrivals) != len(lengths):
        raise ValueError(f"{len(arrivals)} arrivals but {len(lengths)} length pairs")
    if models is None:
        models = assign_models(len(arrivals), mix, seed)
    elif len(models) != len(arrivals):
        raise ValueError(f"{len(arrivals)} arrivals but {len(models)} models")
    items = []
    for t, (p, o), m in zip(arrivals, lengths, models, strict=True):
        if max_total is not None:
            p, o = fit_context(p, o, max_total)
        items.append(WorkItem(float(t), m, int(p), int(o)))
    items.sort(key=lambda w: w.arrival_s)
    return items


def workload_summary(workload: Sequence[WorkItem]) -> dict[str, Any]:
    """Request count, arrival span and rate, mean lengths and requests per model (for reports)."""
    n = len(workload)
    if n == 0:
        return {"requests": 0}
    span = max(w.arrival_s for w in workload) - min(w.arrival_s for w in workload)
    return {
        "requests": n,
        "arrival_span_s": span,
        "rate_rps": (n - 1) / span if span > 0 else None,
        "mean_prompt_len": sum(w.prompt_len for w in workload) / n,
        "mean_output_len": sum(w.output_len for w in workload) / n,
        "max_total_len": max(w.prompt_len + w.output_len for w in workload),
        "per_model": dict(sorted(Counter(w.model for w in workload).items())),
    }


# ---- specs ---------------------------------------------------------------------------------------

_COMMON_KEYS = {"seed", "lengths", "mix", "max_len", "max_total", "prompt_len", "output_len"}
SPEC_KEYS: dict[str, tuple[set[str], set[str]]] = {  # kind -> (required keys, optional keys)
    "poisson": ({"rate", "n"}, _COMMON_KEYS),
    "gamma": ({"rate", "cv", "n"}, _COMMON_KEYS),
    "bursts": ({"rate", "cv", "n"}, _COMMON_KEYS),
    "azure": ({"path"}, _COMMON_KEYS | {"scale", "n", "start"}),
}
_INT_KEYS = {"n", "seed", "max_len", "max_total", "prompt_len", "output_len"}
_FLOAT_KEYS = {"rate", "cv", "scale", "start"}


def parse_spec(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """Check a workload spec and convert its values; returns {'kind': ..., key: value, ...}.

    A string spec is `kind:key=value,key=value,...`, e.g. 'poisson:rate=2,n=100,mix=c1'. A dict
    spec has the same keys plus 'kind'. Errors are ValueErrors that name the offending key."""
    fields = _split_spec(spec) if isinstance(spec, str) else dict(spec)
    kind = fields.pop("kind", None)
    if kind not in SPEC_KEYS:
        raise ValueError(f"workload kind {kind!r} is not one of {', '.join(SPEC_KEYS)}")
    required, optional = SPEC_KEYS[kind]
    for key in fields:
        if key not in required | optional:
            allowed = ", ".join(sorted(required | optional))
            raise ValueError(f"unknown key {key!r} in a {kind} workload spec (allowed: {allowed})")
    missing = sorted(required - set(fields))
    if missing:
        raise ValueError(f"a {kind} workload spec needs the key {missing[0]!r}")
    out: dict[str, Any] = {"kind": kind}
    for key, value in fields.items():
        out[key] = _convert(key, value)
    return out


def _split_spec(spec: str) -> dict[str, str]:
    kind, sep, rest = spec.strip().partition(":")
    fields: dict[str, str] = {"kind": kind.strip().lower()}
    if not sep or not rest.strip():
        return fields
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"workload spec part {part!r} is not key=value")
        if key in fields:
            raise ValueError(f"key {key!r} appears twice in the workload spec")
        fields[key] = value.strip()
    return fields


def _convert(key: str, value: Any) -> Any:
    """One spec value, typed and range-checked: counts and seeds are integers >= 0, lengths
    integers >= 1, rates, cv and scale numbers > 0, start a number >= 0."""
    if key in _INT_KEYS:
        low = 0 if key in ("n", "seed") else 1
        number = _number(key, value, int)
        if number < low:
            raise ValueError(f"workload spec key {key!r}: must be >= {low}, got {value!r}")
        return number
    if key in _FLOAT_KEYS:
        number = _number(key, value, float)
        if key == "start" and number < 0 or key != "start" and number <= 0:
            bound = ">= 0" if key == "start" else "> 0"
            raise ValueError(f"workload spec key {key!r}: must be {bound}, got {value!r}")
        return number
    if key == "mix":
        return _convert_mix(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"workload spec key {key!r}: expected a non-empty string, got {value!r}")
    return value


def _number(key: str, value: Any, kind: type) -> Any:
    """`value` (a string from a spec, or a number from a dict spec) as an int or a finite float."""
    what = "an integer" if kind is int else "a number"
    try:
        if isinstance(value, bool):
            raise ValueError
        if kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                value = int(value)
            number = int(value)
        else:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"workload spec key {key!r}: expected {what}, got {value!r}") from None
    return number


def _convert_mix(value: Any) -> dict[str, float]:
    """A mix name ('c1'), tenants with equal shares ('a+b'), tenants with weights ('a:3+b:1'), or a
    {tenant: weight} mapping."""
    try:
        if isinstance(value, Mapping):
            return normalize_mix(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a name or a mapping, got {value!r}")
        if value.lower() in MIXES:
            return normalize_mix(value)
        weights: dict[str, float] = {}
        for part in value.split("+"):
            name, colon, w = part.partition(":")
            if not name.strip():
                raise ValueError(f"empty tenant name in {value!r}")
            weights[name.strip()] = float(w) if colon else 1.0
        return normalize_mix(weights)
    except ValueError as e:
        raise ValueError(
            f"workload spec key 'mix': {e} (use {' or '.join(MIXES)}, 'a+b' or 'a:3+b:1')"
        ) from None


def workload_from_spec(spec: str | Mapping[str, Any]) -> list[WorkItem]:
    """Build a workload from a spec (see `parse_spec`). Keys:

      poisson: rate, n              gamma: rate, cv, n          azure: path [scale, n, start]
      bursts: rate, cv, n (a Gamma process per model of the mix, see `model_bursts`)
      common:  seed (0), mix (c1), lengths (sharegpt; azure: trace), max_len (2048; clips each
               sampled length), max_total (fit prompt + output into a context), prompt_len and
               output_len (for lengths=fixed)

    lengths is sharegpt, alpaca, fixed or (azure only) trace. For azure, n caps the number of rows,
    scale divides arrival times and start skips that many trace seconds."""
    s = parse_spec(spec)
    seed = s.get("seed", 0)
    models = None  # drawn from the mix per request, except for bursts
    if s["kind"] == "azure":
        rows = read_azure_trace(s["path"], s.get("scale", 1.0), s.get("n"), s.get("start", 0.0))
        arrivals = [r.arrival_s for r in rows]
        trace_lengths = [(r.prompt_len, r.output_len) for r in rows]
        lengths = _spec_lengths(s, len(rows), seed, trace_lengths)
    else:
        if s["kind"] == "poisson":
            arrivals = poisson_arrivals(s["rate"], s["n"], seed)
        elif s["kind"] == "bursts":
            arrivals, models = model_bursts(s["rate"], s["cv"], s["n"], s.get("mix", "c1"), seed)
        else:
            arrivals = gamma_arrivals(s["rate"], s["cv"], s["n"], seed)
        lengths = _spec_lengths(s, len(arrivals), seed, None)
    return build_workload(
        arrivals, lengths, s.get("mix", "c1"), seed, s.get("max_total"), models
    )


def _spec_lengths(
    s: dict[str, Any], n: int, seed: int, trace: list[tuple[int, int]] | None
) -> list[tuple[int, int]]:
    name = s.get("lengths", "trace" if trace is not None else "sharegpt")
    fixed_keys = {"prompt_len", "output_len"} & set(s)
    if name != "fixed" and fixed_keys:
        raise ValueError(f"workload spec key {min(fixed_keys)!r} needs lengths=fixed")
    if name == "fixed":
        for key in ("prompt_len", "output_len"):
            if key not in s:
                raise ValueError(f"lengths=fixed needs the workload spec key {key!r}")
        return [(s["prompt_len"], s["output_len"])] * n
    if name == "trace":
        if trace is None:
            raise ValueError("workload spec key 'lengths': 'trace' needs an azure workload")
        max_len = s.get("max_len")
        if max_len is None:
            return trace
        return [(min(p, max_len), min(o, max_len)) for p, o in trace]
    if name not in LENGTH_FITS:
        known = ", ".join([*LENGTH_FITS, "fixed", "trace"])
        raise ValueError(f"workload spec key 'lengths': unknown {name!r} (known: {known})")
    return sample_lengths(name, n, seed, s.get("max_len", DEFAULT_MAX_LEN))
