"""Commit: a step's results become tokens, stop decisions and outputs, and the step's data becomes the
per-model counters. Commit is the one writer of every `TenantCounters` field: the scheduler, the
arbiter and the remapping controller only put what they decided into the `Step`."""

from __future__ import annotations

from oneiros.core import (
    EvictLayer,
    MoveKV,
    MoveLayer,
    Prefix,
    Request,
    RequestOutput,
    RequestStatus,
    RestoreLayer,
    Step,
    StepPlan,
    StepResult,
)
from oneiros.engine.tenant import Tenant
from oneiros.engine.tokenizer import IncrementalText


class Committer:
    def __init__(self, tenants: dict[str, Tenant]) -> None:
        self.tenants = tenants
        self.texts: dict[str, IncrementalText] = {}  # running requests' detokenisers

    def commit(self, step: Step, results: list[StepResult], now: float) -> list[RequestOutput]:
        """Outputs of the step (requests planning gave up on first), counters updated."""
        outputs = [self.finish(self.tenants[r.model], r) for r in step.finished]
        for plan, result in zip(step.plans, results):
            t = self.tenants[plan.model]
            outputs += self._tokens(t, plan, result, now)
            t.state.last_run = now
        count(self.tenants, step, results)
        return outputs

    def _tokens(
        self, t: Tenant, plan: StepPlan, result: StepResult, now: float
    ) -> list[RequestOutput]:
        index = {rid: k for k, rid in enumerate(result.request_ids)}
        outputs = []
        for s in plan.seqs:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            if not s.samples:
                continue
            k = index[req.request_id]
            req.output_token_ids.append(result.token_ids[k])
            req.output_logprobs.append(result.logprobs[k])
            if result.top_logprobs is not None:
                req.top_logprobs.append(result.top_logprobs[k])
            req.token_times.append(now)
            if t.tokenizer is not None:
                text = self.texts.get(req.request_id)
                if text is None:
                    text = self.texts[req.request_id] = IncrementalText(t.tokenizer)
                req.output_text = text.update(req.output_token_ids)
            status = stop_status(t, req)
            if status is not None:
                t.scheduler.finish(req, status)
                outputs.append(self.finish(t, req))
            else:
                outputs.append(output(t, req))
        return outputs

    def finish(self, t: Tenant, req: Request) -> RequestOutput:
        """The final output of a finished request (its full text decoded once more, unless a stop
        string cut it)."""
        self.texts.pop(req.request_id, None)
        stopped_by_string = isinstance(req.stop_reason, str) and req.stop_reason in req.params.stop
        if t.tokenizer is not None and not stopped_by_string:
            req.output_text = t.tokenizer.decode(req.output_token_ids)
        return output(t, req)


def stop_status(t: Tenant, req: Request) -> RequestStatus | None:
    p, tok = req.params, req.output_token_ids[-1]
    if not p.ignore_eos and tok in t.eos_token_ids:
        req.stop_reason = tok
        return RequestStatus.FINISHED_STOPPED
    if tok in p.stop_token_ids:
        req.stop_reason = tok
        return RequestStatus.FINISHED_STOPPED
    if p.stop and t.tokenizer is not None:
        text = req.output_text
        hits = [(i, s) for s in p.stop if (i := text.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            req.output_text = text[: i + len(s)] if p.include_stop_str_in_output else text[:i]
            req.stop_reason = s
            return RequestStatus.FINISHED_STOPPED
    if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= t.max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def output(t: Tenant, req: Request) -> RequestOutput:
    # A finished request's lists never change again: they are handed over as they are. A
    # running one's are shared as views of their current length (no copy per token).
    view = (lambda xs: xs) if req.finished else Prefix
    return RequestOutput(
        request_id=req.request_id,
        model=t.name,
        prompt_token_ids=req.prompt_token_ids,
        token_ids=view(req.output_token_ids),
        text=req.output_text,
        logprobs=view(req.output_logprobs),
        top_logprobs=view(req.top_logprobs),
        finished=req.finished,
        finish_reason=req.status.finish_reason,
        arrival_time=req.arrival_time,
        token_times=view(req.token_times),
        num_preemptions=req.num_preemptions,
    )


def count(tenants: dict[str, Tenant], step: Step, results: list[StepResult]) -> None:
    """Fold one step's data into the per-model counters."""
    for plan, result in zip(step.plans, results):
        c = tenants[plan.model].state.counters
        c.steps += 1
        c.prefill_tokens += plan.num_prefill_tokens
        c.decode_tokens += plan.num_tokens - plan.num_prefill_tokens
        c.h2d_bytes += result.h2d_bytes
        c.stream_copy_s += result.copy_s
        c.stream_exposed_s += result.exposed_s
    for plan in step.plans + step.idle:
        t = tenants[plan.model]
        c = t.state.counters
        c.preemptions += len(plan.preempted)
        c.recomputed_tokens += plan.recomputed_tokens
        c.prefix_cache_queries += plan.prefix_queries
        c.prefix_cache_hits += plan.prefix_hits
        c.swap_out_bytes += len(plan.swap_out) * t.pool.block_bytes
        c.swap_in_bytes += len(plan.swap_in) * t.pool.block_bytes
    for op in step.memory:
        if isinstance(op, (EvictLayer, RestoreLayer, MoveLayer)):
            t = tenants[op.model]
            c = t.state.counters
            if isinstance(op, EvictLayer):
                c.remapped_layers += 1
            else:
                c.h2d_bytes += t.residency.layer_bytes
                if isinstance(op, RestoreLayer):
                    c.restored_layers += 1
                else:
                    c.compaction_moves += 1
        elif isinstance(op, MoveKV):
            tenants[op.model].state.counters.kv_pages_moved += len(op.pages)
    for (model, name), n in step.notes.items():
        c = tenants[model].state.counters
        setattr(c, name, getattr(c, name) + n)
