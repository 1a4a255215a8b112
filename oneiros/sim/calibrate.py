"""Fit a hardware profile's efficiencies and overheads to a measured step trace.

The trace is the engine's `trace_steps` JSONL (one line per step: plans with token counts, attention
pairs, context reads, copies, and the step's wall time). Peak numbers stay those of the base profile;
what is fitted is how much of them the engine reaches:
    dt = overhead + per_token x tokens + per_seq x sequences + multi x [tokens >= 2]
         + max(tf, tb) + overlap x min(tf, tb)
    tf = FLOPs / (peak x compute_eff),  tb = bytes / (bandwidth x mem_eff)
by a grid over (compute_eff, mem_eff, overlap) with the four linear terms solved by non-negative
least squares at each point, minimising the squared relative error (short decode steps count as much
as long prefills). The per-sequence term is what lets one fit serve both kinds of step: without it a
CPU's decode steps (many sequences, one token each: an attention call and a sampled row apiece) pull
the compute efficiency down, and prefills of a few hundred tokens came out 30% to 50% too slow, which
is what TTFT is made of. The multi-token term is a step of two or more tokens running matrix-matrix
kernels where a one-token step runs matrix-vector ones: on this project's 2-core VM a decode step
of two sequences took twice as long as one of one (150 against 70 ms) and little more than one of
eight, which a model linear in sequences cannot follow. Efficiencies stay shares of the base
profile's peaks (at most 1). Steps that swapped KV or streamed layers are left out: their copies
are not compute.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from oneiros.core import ConfigError
from oneiros.sim.cost import ModelCost, StepWork, flops_bytes
from oneiros.sim.hardware import HardwareProfile


def read_steps(path: str | Path) -> list[dict]:
    steps = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    return steps


def _compute_plans(rec: dict) -> list[dict]:
    """A traced step's plans that ran sequences, or none when any of them swapped KV or streamed
    layers (their copies are not compute): the steps a cost fit can use."""
    plans = [p for p in rec["plans"] if p.get("batch", 0) > 0]
    copies = ("swap_out_blocks", "swap_in_blocks", "h2d_bytes")
    if any(p.get(k) for p in plans for k in copies):
        return []
    return plans


def step_features(
    steps: list[dict], costs: dict[str, ModelCost], dtype_bytes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per usable step: FLOPs, bytes, tokens, sequences, plans of two or more tokens, measured
    seconds."""
    rows = []
    for rec in steps:
        plans = _compute_plans(rec)
        if not plans:
            continue
        f = b = tok = seqs = multi = 0.0
        for p in plans:
            if p["model"] not in costs:
                raise ConfigError(f"the trace has model {p['model']!r}; pass its source too")
            if "attn_pairs" not in p:
                raise ConfigError("the trace lacks attn_pairs: record it with this version")
            tokens = p["prefill_tokens"] + p["decode_tokens"]
            w = StepWork(tokens, p["sampled"], p["attn_pairs"], p["context_tokens"], p["batch"])
            df, db = flops_bytes(costs[p["model"]], w, dtype_bytes)
            f, b, tok, seqs = f + df, b + db, tok + tokens, seqs + p["batch"]
            multi += tokens >= 2
        rows.append((f, b, tok, seqs, multi, rec["dt"]))
    if len(rows) < 8:
        raise ConfigError(f"only {len(rows)} usable steps in the trace; calibrate needs at least 8")
    a = np.array(rows, dtype=np.float64)
    return a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5]


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients, for a few columns: the best of every set of
    free columns whose unconstrained solution is non-negative (the others held at zero)."""
    k = x.shape[1]
    best, best_err = np.zeros(k), float((y**2).sum())
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            sol, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if (sol < 0).any():
                continue
            coef = np.zeros(k)
            coef[list(cols)] = sol
            err = float(((x @ coef - y) ** 2).sum())
            if err < best_err:
                best, best_err = coef, err
    return best


def fit(
    base: HardwareProfile, steps: list[dict], costs: dict[str, ModelCost], name: str | None = None
) -> tuple[HardwareProfile, dict[str, float]]:
    """The base profile with fitted efficiencies and overheads, and fit statistics."""
    flops, nbytes, tokens, seqs, multi, dt = step_features(steps, costs, base.dtype_bytes)
    w = 1.0 / dt  # relative error
    x = np.stack([np.ones_like(dt), tokens, seqs, multi], axis=1) * w[:, None]
    best = None
    for ce in np.geomspace(0.01, 1.0, 41):
        tf = flops / (base.peak_flops * ce)
        for me in np.geomspace(0.01, 1.0, 41):
            tb = nbytes / (base.mem_bw * me)
            hi, lo = np.maximum(tf, tb), np.minimum(tf, tb)
            for ov in (0.0, 0.25, 0.5, 0.75, 1.0):
                resid = dt - hi - ov * lo
                coef = _nnls(x, resid * w)
                pred = hi + ov * lo + coef[0] + coef[1] * tokens + coef[2] * seqs + coef[3] * multi
                err = float((((pred - dt) / dt) ** 2).mean())
                if best is None or err < best[0]:
                    best = (err, ce, me, ov, coef)
    assert best is not None
    err, ce, me, ov, coef = best
    prof = replace(
        base, name=name or f"{base.name}-calibrated", compute_eff=float(ce), mem_eff=float(me),
        overlap=float(ov), step_overhead_s=float(coef[0]), layer_overhead_s=0.0,
        token_overhead_s=float(coef[1]), seq_overhead_s=float(coef[2]),
        multi_token_overhead_s=float(coef[3]),
        source=f"{base.source}; efficiencies fitted to {len(dt)} measured steps",
    )
    stats = {"steps": int(len(dt)), "rms_relative_error": err**0.5, **step_noise(steps)}
    return prof, stats


def step_noise(steps: list[dict], context_bucket: int = 64) -> dict[str, float | None]:
    """The floor any per-step cost model meets on this trace: the rms relative deviation of steps
    from the median of steps of the same shape (per plan: model, sequences, prefill and decode
    tokens, context tokens within `context_bucket`), over shapes seen at least three times, on the
    steps the fit uses. On a quiet machine it is a few percent; on a shared VM it can exceed the
    fit's own error."""
    groups: dict[tuple, list[float]] = {}
    for rec in steps:
        plans = _compute_plans(rec)
        if not plans:
            continue
        shape = tuple(
            (p["model"], p["batch"], p["prefill_tokens"], p["decode_tokens"],
             p.get("context_tokens", 0) // context_bucket)
            for p in plans
        )
        groups.setdefault(shape, []).append(rec["dt"])
    dev = [
        (x - med) / med
        for xs in groups.values() if len(xs) >= 3
        for med in [float(np.median(xs))] if med > 0
        for x in xs
    ]
    if not dev:
        return {"noise_steps": 0, "noise_rms_relative": None}
    return {
        "noise_steps": len(dev), "noise_rms_relative": float(np.sqrt(np.mean(np.square(dev)))),
    }
