"""The simulator's cost model: how long one engine step takes on a hardware profile.

A step's work is counted from its plan: FLOPs (weights x tokens, attention over each sequence's
context, the LM head on sampled rows) and bytes (weights read once per step, each sequence's KV read
once per layer, new KV written). Time is a roofline with efficiencies:
    compute = FLOPs / (peak x compute_eff),  memory = bytes / (bandwidth x mem_eff)
    step    = overheads + max(compute, memory) + overlap x min(compute, memory)
    overheads = per step + per layer + per token + per sequence (a decode step of many short
                sequences pays per sequence what a prefill of as many tokens pays once)
                + once for a plan of two or more tokens (matrix-matrix kernels instead of the
                matrix-vector ones of a one-token pass)
Copies (KV swaps, restores, streamed layers) are priced by `sim/executor.py` on one host link
(`memory/passplan.py`: HostLink and the pass replay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from oneiros.core import StepPlan
from oneiros.sim.hardware import HardwareProfile


@dataclass(frozen=True)
class ModelCost:
    """The geometry the cost model needs, in elements (multiply by dtype bytes for bytes)."""

    num_layers: int
    layer_params: int  # parameters of one decoder layer
    head_params: int  # LM head (vocab x hidden)
    num_heads: int
    head_dim: int
    kv_elems_per_token: int  # K and V of every layer, per token

    @staticmethod
    def of(model) -> ModelCost:  # a DecoderModel (any device, meta included)
        c = model.cfg
        layer = sum(math.prod(s) for s in model.layer_shapes().values())
        return ModelCost(
            c.num_layers, layer, c.vocab_size * c.hidden_size, c.num_heads, c.head_dim,
            c.num_layers * 2 * c.num_kv_heads * c.head_dim,
        )


@dataclass(frozen=True)
class StepWork:
    tokens: int  # new tokens through the layers
    sampled: int  # rows through the LM head
    attn_pairs: int  # sum over sequences of (query, key) pairs attended
    kv_read_tokens: int  # sum over sequences of context tokens whose KV is read
    seqs: int = 0  # sequences in the step

    @staticmethod
    def of(plan: StepPlan) -> StepWork:
        return StepWork(
            plan.num_tokens,
            sum(s.samples for s in plan.seqs),
            sum(s.attn_pairs for s in plan.seqs),
            sum(s.context_len for s in plan.seqs),
            len(plan.seqs),
        )


def flops_bytes(m: ModelCost, w: StepWork, dtype_bytes: int) -> tuple[float, float]:
    flops = 2.0 * m.layer_params * m.num_layers * w.tokens
    flops += 2.0 * m.head_params * w.sampled
    flops += 4.0 * m.num_heads * m.head_dim * m.num_layers * w.attn_pairs
    nbytes = dtype_bytes * (m.layer_params * m.num_layers + m.head_params)
    nbytes += dtype_bytes * m.kv_elems_per_token * (w.kv_read_tokens + w.tokens)
    return flops, nbytes


def compute_time(hw: HardwareProfile, flops: float, nbytes: float) -> float:
    tf = flops / (hw.peak_flops * hw.compute_eff)
    tb = nbytes / (hw.mem_bw * hw.mem_eff)
    return max(tf, tb) + hw.overlap * min(tf, tb)


def overhead_time(hw: HardwareProfile, num_layers: int, w: StepWork) -> float:
    return (
        hw.step_overhead_s + hw.layer_overhead_s * num_layers + hw.token_overhead_s * w.tokens
        + hw.seq_overhead_s * w.seqs + hw.multi_token_overhead_s * (w.tokens >= 2)
    )
