"""The step trace (`--trace-steps`): one JSON line per engine step with its plans (executed ones
first, then plans that only preempted), the copies each made, the layer remap/restore events and the
arena's page owners. `oneiros calibrate` fits hardware profiles to it."""

from __future__ import annotations

import itertools
import json
from collections import Counter

from oneiros.core import EvictLayer, RestoreLayer, Step, StepResult
from oneiros.engine.tenant import Tenant
from oneiros.memory.arena import PageArena


class StepTrace:
    def __init__(self, path: str) -> None:
        self._file = open(path, "a")  # noqa: SIM115 (closed by close())

    def write(
        self,
        step: Step,
        t1: float,
        results: list[StepResult],
        tenants: dict[str, Tenant],
        arena: PageArena,
        after: Step | None = None,
    ) -> None:
        """`after`: the memory actions planned right after the step (dynamic reversion)."""
        memory = step.memory + (after.memory if after is not None else [])
        remapped = Counter(op.model for op in memory if isinstance(op, EvictLayer))
        restored = Counter(op.model for op in memory if isinstance(op, RestoreLayer))
        events = {
            name: {
                "remapped": remapped[name],
                "restored": restored[name],
                "layers_missing": len(t.residency.missing_layers),
            }
            for name, t in tenants.items() if remapped[name] or restored[name]
        }
        rec = {
            "t": step.now,
            "dt": t1 - step.now,
            "plans": [
                {
                    "model": p.model,
                    "batch": len(p.seqs),
                    "prefill_tokens": p.num_prefill_tokens,
                    "decode_tokens": p.num_tokens - p.num_prefill_tokens,
                    "context_tokens": sum(s.context_len for s in p.seqs),
                    # rows the executor sampled (one token each); written after the commit,
                    # when ScheduledSeq.samples no longer holds (the token is appended)
                    "sampled": len(r.token_ids) if r is not None else 0,
                    "attn_pairs": sum(s.attn_pairs for s in p.seqs),
                    "preempted": len(p.preempted),
                    "swap_out_blocks": len(p.swap_out),
                    "swap_in_blocks": len(p.swap_in),
                    "executed": r is not None,  # False: an empty plan that only preempted
                    "h2d_bytes": r.h2d_bytes if r is not None else 0,
                    "copy_s": r.copy_s if r is not None else 0.0,
                    "exposed_s": r.exposed_s if r is not None else 0.0,
                }
                for p, r in itertools.zip_longest(step.plans + step.idle, results)
            ],
            "remap": events,
            "pages": arena.usage_by_kind(),
        }
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
