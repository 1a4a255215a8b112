"""The simulator's cost model: how long one engine step takes on a hardware profile.

A step's work is counted from its plan: FLOPs (weights x tokens, attention over each sequence's
context, the LM head on sampled rows) and bytes (weights read once per step, each sequence's KV read
once per layer, new KV written). Time is a roofline with efficiencies:
    compute = FLOPs / (peak x compute_eff),  memory = bytes / (bandwidth x mem_eff)
    step    = overheads + max(compute, memory) + overlap x min(compute, memory)
Copies: KV swaps are synchronous before the pass (one-way or mixed bandwidth); restoring a layer is a
synchronous host-to-device copy; streaming non-resident layers follows the transfer planner's pass
plan on a copy stream, overlapped with the layers' compute where the profile copies asynchronously.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from oneiros.core import StepPlan
from oneiros.memory.passplan import plan_pass
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

    @staticmethod
    def of(plan: StepPlan) -> StepWork:
        return StepWork(
            plan.num_tokens,
            sum(s.samples for s in plan.seqs),
            sum(s.attn_pairs for s in plan.seqs),
            sum(s.context_len for s in plan.seqs),
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


def overhead_time(hw: HardwareProfile, num_layers: int, tokens: int) -> float:
    return hw.step_overhead_s + hw.layer_overhead_s * num_layers + hw.token_overhead_s * tokens


def swap_time(hw: HardwareProfile, out_bytes: int, in_bytes: int) -> float:
    """KV swaps before the pass: one way at the one-way bandwidth, both ways at the mixed one."""
    if out_bytes and in_bytes:
        return max(out_bytes, in_bytes) / hw.mixed_bw
    return out_bytes / hw.d2h_bw + in_bytes / hw.h2d_bw


@dataclass(frozen=True)
class StreamCost:
    copies: int
    copy_s: float  # copy-stream busy time
    exposed_s: float  # time the pass waited for copies


def stream_pass(
    hw: HardwareProfile, num_layers: int, missing: tuple[int, ...], distance: int,
    layer_bytes: int, layer_s: float,
) -> StreamCost:
    """Replay one pass of the transfer plan: layers run in order, each `layer_s` long; a copy starts
    when the layer freeing its slab has run and the copy stream is free; a missing layer waits for
    its copy. The borrowed slabs' own layers must be back before the next pass reaches them."""
    if not missing:
        return StreamCost(0, 0.0, 0.0)
    plan = plan_pass(num_layers, missing, distance)
    one = layer_bytes / hw.h2d_bw
    if not hw.async_copies:
        return StreamCost(plan.num_copies, plan.num_copies * one, plan.num_copies * one)
    ready: dict[int, float] = {}
    t = stream = 0.0
    for c in plan.starting_after(-1):
        stream += one
        ready[c.layer] = stream
    for i in range(num_layers):
        t = max(t, ready.get(i, 0.0)) if i in plan.slab_of else t
        t += layer_s
        for c in plan.starting_after(i):
            stream = max(stream, t) + one
            ready[c.layer] = stream
    # A restored slab is needed again at its own layer early in the next pass.
    tail = max((ready[s] - s * layer_s for s in set(plan.slab_of.values())), default=t)
    end = max(t, tail)
    return StreamCost(plan.num_copies, plan.num_copies * one, end - num_layers * layer_s)
