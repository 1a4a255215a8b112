"""LLMEngine: a step is plan -> execute -> commit.

    plan    = scheduler.schedule()          which requests, how many tokens, blocks reserved
    result  = executor.execute(plan)        forward pass + sampling (real or simulated)
    outputs = self._commit(plan, result)    append tokens, apply stop rules, free finished requests

Several models ("tenants") share one page arena; each has its own layer slabs, KV pool and scheduler.
The tenancy policy picks the models of a step (temporal: one; spatial: every model with work). When a
model's KV pool is out of blocks, `_make_room` takes idle KV pages of other models; the policy decides
what happens when that is not enough (recompute, swap) or forbids sharing at all (static shares).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from oneiros import attention as attention_backends
from oneiros.config import EngineConfig, MiB, free_device_memory
from oneiros.core import (
    ConfigError,
    InvalidRequestError,
    Prefix,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    StepPlan,
    StepResult,
    UnknownModelError,
)
from oneiros.engine.clock import Clock, VirtualClock
from oneiros.engine.executor import Executor, ModelRunner, TorchExecutor
from oneiros.engine.graphs import batch_sizes
from oneiros.engine.remapping import RemapController
from oneiros.engine.sampler import Sampler
from oneiros.engine.scheduler import Scheduler, preempt_younger
from oneiros.engine.tenancy import MetadataStore, TenancyPolicy, TenantState
from oneiros.engine.tokenizer import IncrementalText, Tokenizer
from oneiros.memory.arena import PageArena
from oneiros.memory.bandwidth import cached_probe
from oneiros.memory.kv import KVPool
from oneiros.memory.storage import DeviceArena
from oneiros.memory.swap import HostBlockPool
from oneiros.memory.weights import ModelWeights, weight_pages
from oneiros.models.base import DecoderModel
from oneiros.models.loader import ModelSource, resolve
from oneiros.models.registry import build_model

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Tenant:
    """One served model and everything that belongs to it."""

    name: str
    source: ModelSource
    model: DecoderModel
    weights: ModelWeights
    pool: KVPool
    scheduler: Scheduler
    tokenizer: Tokenizer | None
    eos_token_ids: frozenset[int]
    max_model_len: int
    state: TenantState


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use cpu or cuda[:N])") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported (use cpu or cuda[:N])")
    return dev


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.clock = Clock()
        self.hardware = None
        dt = config.dtype
        if config.executor == "sim":
            # The simulator: the same engine on the meta device (page accounting, no bytes), a
            # virtual clock, and a cost model of the hardware profile in place of the model.
            from oneiros.sim.hardware import load_profile

            self.hardware = load_profile(config.hardware or "")
            self.device = torch.device("meta")
            self.clock = VirtualClock()
            auto = torch.float32 if self.hardware.dtype_bytes == 4 else torch.bfloat16
        else:
            self.device = _device(config.device)
            auto = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = _DTYPES[dt] if dt != "auto" else auto
        sources = {name: resolve(src) for name, src in config.models.items()}
        models = {n: build_model(s.config, self.dtype, self.device) for n, s in sources.items()}
        self.attention = attention_backends.choose(
            config.attention, self.device.type, config.block_size,
            [m.cfg.head_dim for m in models.values()],
        )
        if not self.hardware:
            backend = attention_backends.load(self.attention)
            for m in models.values():
                m.attention = backend
        page = config.page_bytes or self._auto_page_bytes(models.values())
        self.arena_page_bytes = page
        budget = self._budget(sum(weight_pages(m, page) for m in models.values()) * page)
        self.arena = PageArena(budget // page, page)
        self.storage = DeviceArena(self.arena.num_pages, page, self.device)
        self.store = MetadataStore(list(models))
        self.tenancy = TenancyPolicy(config.sharing, config.max_wait_s)
        self.tenants: dict[str, Tenant] = {}
        for name, model in models.items():
            self.tenants[name] = self._load_tenant(name, sources[name], model)
        if config.policy == "static":
            self._split_kv_statically()
        self.executor: Executor = self._sim_executor() if self.hardware else TorchExecutor(
            {
                n: ModelRunner(
                    t.weights,
                    t.pool,
                    self.storage,
                    Sampler(self.device, config.seed),
                    t.scheduler.host_pool.num_blocks if t.scheduler.host_pool else 0,
                    config.prefetch_distance,
                    batch_sizes(config.max_num_seqs) if config.cuda_graphs else None,
                    -(-t.max_model_len // config.block_size),
                )
                for n, t in self.tenants.items()
            }
        )
        self.remapper: RemapController | None = None
        if config.policy == "oneiros":
            bw = config.h2d_bytes_per_s or (
                self.hardware.h2d_bw if self.hardware else cached_probe(self.device).h2d
            )
            self.remapper = RemapController(
                self.tenants,
                config.sharing,
                config.max_remap_fraction,
                config.revert_reserve,
                config.revert_hold_steps,
                lambda: self.tenancy.order(self.store),
                bw,
                self.executor.residency_changed,
                config.donor_order,
                config.revert,
                config.prefetch_distance,
            )
        self._requests: dict[str, tuple[Tenant, Request]] = {}
        self._texts: dict[str, IncrementalText] = {}  # running requests' detokenisers
        self._idle_reverted = False  # revert_idle ran since the last step
        self._planned: set[str] = set()  # models whose plan for the current step is made
        self._foreign: dict[str, StepPlan] = {}  # preemptions made for another model's request
        self._trace = open(config.trace_steps, "a") if config.trace_steps else None  # noqa: SIM115
        self._record_pages(self.clock.now())

    # ---- construction ---------------------------------------------------------------------------
    def _auto_page_bytes(self, models) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        block = max(self.config.block_size * m.cfg.kv_bytes_per_token(itemsize) for m in models)
        return max(2 * MiB, 1 << (block - 1).bit_length())

    def _sim_executor(self) -> Executor:
        from oneiros.sim.cost import ModelCost
        from oneiros.sim.executor import SimExecutor, SimTenant

        def copied(t: Tenant) -> Callable[[], int]:
            c = t.state.counters
            return lambda: c.restored_layers + c.compaction_moves

        sims = {
            n: SimTenant(
                ModelCost.of(t.model), t.weights.layer_layout.nbytes, t.pool.block_bytes,
                t.model.cfg.vocab_size, lambda w=t.weights: w.missing_layers, copied(t),
            )
            for n, t in self.tenants.items()
        }
        assert self.hardware is not None and isinstance(self.clock, VirtualClock)
        return SimExecutor(self.hardware, self.clock, sims, self.config.prefetch_distance)

    def _budget(self, weight_bytes: int) -> int:
        b = self.config.memory_budget
        if b is None:
            b = weight_bytes + 1024 * MiB if self.device.type == "cpu" else 0.9
        if isinstance(b, float):
            if not 0.0 < b <= 1.0:
                raise ConfigError(f"a fractional memory budget must be in (0, 1], got {b}")
            free = (
                self.hardware.memory_bytes if self.hardware
                else free_device_memory(str(self.device))
            )
            b = int(b * free)
        if b < weight_bytes + self.arena_page_bytes:
            raise ConfigError(
                f"memory budget of {b / MiB:.0f} MiB is too small: the weights alone need "
                f"{weight_bytes / MiB:.0f} MiB, plus at least one page for KV cache"
            )
        return int(b)

    def _load_tenant(self, name: str, source: ModelSource, model: DecoderModel) -> Tenant:
        cfg, c = self.config, model.cfg
        weights = ModelWeights(name, model, self.arena, self.storage)
        weights.load(None if self.hardware else source)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        block_bytes = cfg.block_size * c.kv_bytes_per_token(itemsize)
        pool = KVPool(name, self.arena, block_bytes, cfg.block_size)
        max_len = min(cfg.max_model_len or c.max_position_embeddings, c.max_position_embeddings)
        state = self.store.states[name]
        host_pool = None
        preemption = cfg.remap_fallback if cfg.policy == "oneiros" else cfg.policy
        preemption = preemption if preemption == "swap" else "recompute"
        if preemption == "swap":
            share = cfg.swap_space // len(cfg.models)
            host_pool = HostBlockPool(name, share // block_bytes, block_bytes)
        sched = Scheduler(
            name,
            pool,
            cfg.max_num_seqs,
            cfg.max_num_batched_tokens,
            max_len,
            preemption=preemption,
            host_pool=host_pool,
            make_room=None if cfg.policy == "static" else lambda n, r: self._make_room(name, n, r),
            counters=state.counters,
            remappable_pages=self._remappable_pages if cfg.policy == "oneiros" else None,
            can_wait=None if cfg.policy == "static" else lambda r: self._can_wait(name, r),
        )
        tok = Tokenizer(source.tokenizer_dir) if source.tokenizer_dir else None
        eos = set(c.eos_token_ids)
        if tok is not None and tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        return Tenant(
            name, source, model, weights, pool, sched, tok, frozenset(eos), max_len, state
        )

    def _split_kv_statically(self) -> None:
        """Static policy: every free page goes to some model's KV pool now, in equal shares, so no
        model can ever use another's (one engine per model with a memory fraction, in effect)."""
        pools = [t.pool for t in self.tenants.values()]
        free = self.arena.num_free
        for k, pool in enumerate(pools):
            share = free // len(pools) + (1 if k < free % len(pools) else 0)
            if share and not pool.grow(share):
                raise ConfigError("could not split the KV pages between models")

    # ---- requests -------------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.tenants)

    def tenant(self, model: str | None) -> Tenant:
        if model is None:
            if len(self.tenants) == 1:
                return next(iter(self.tenants.values()))
            raise InvalidRequestError(
                f"this engine serves several models ({', '.join(self.tenants)}): name one", "model"
            )
        if model not in self.tenants:
            raise UnknownModelError(
                f"model {model!r} is not served here (served: {', '.join(self.tenants)})"
            )
        return self.tenants[model]

    def encode(
        self,
        model: str | None,
        prompt: str | list[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        t = self.tenant(model)
        if messages is not None:
            if t.tokenizer is None:
                raise InvalidRequestError(f"model {t.name!r} has no tokenizer", "messages")
            return t.tokenizer.encode_chat(messages)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", "prompt")
            if t.tokenizer is None:
                raise InvalidRequestError(
                    f"model {t.name!r} has no tokenizer: pass token ids instead of text", "prompt"
                )
            return t.tokenizer.encode(prompt)
        if prompt is None:
            raise InvalidRequestError("a prompt is required", "prompt")
        ids = list(prompt)
        vocab = t.model.cfg.vocab_size
        if any(not isinstance(i, int) or not 0 <= i < vocab for i in ids):
            raise InvalidRequestError(f"token ids must be integers in [0, {vocab})", "prompt")
        return ids

    def add_request(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        model: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Queue a request. `arrival_time` (engine clock) defaults to now; a benchmark passes the
        scheduled arrival so that TTFT counts from it."""
        t = self.tenant(model)
        params = params or SamplingParams()
        if params.stop and t.tokenizer is None:
            raise InvalidRequestError(f"model {t.name!r} has no tokenizer for stop strings", "stop")
        req = Request(self.encode(t.name, prompt, messages), params, t.name)
        req.arrival_time = self.clock.now() if arrival_time is None else arrival_time
        if request_id is not None:
            if request_id in self._requests:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            req.request_id = request_id
        t.scheduler.add(req)
        self._requests[req.request_id] = (t, req)
        return req

    def abort(self, request_id: str) -> bool:
        self._texts.pop(request_id, None)
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return False
        t, _ = entry
        t.scheduler.abort(request_id)
        self.executor.release(request_id)
        return True

    def has_unfinished(self) -> bool:
        return any(t.scheduler.has_work for t in self.tenants.values())

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = self.clock.now()
        self._idle_reverted = False
        self._refresh_states()
        outputs: list[RequestOutput] = []
        plans: list[StepPlan] = []
        idle: list[StepPlan] = []  # empty plans that still preempted (traced, not executed)
        marks = {n: self._remap_marks(t) for n, t in self.tenants.items()} if self._trace else {}
        self._planned = set()
        self._foreign = {}
        for name in self.tenancy.order(self.store, t0):
            t = self.tenants[name]
            self.tenancy.ran(self.store, name, t0)
            if self.remapper is not None:
                self.remapper.prepare(t)
            plan = t.scheduler.schedule()
            outputs += [self._finish(t, r) for r in t.scheduler.finished_in_schedule]
            t.scheduler.finished_in_schedule.clear()
            self._planned.add(name)
            if not plan.empty:
                plans.append(plan)
                if not self.tenancy.spatial:
                    break  # temporal: one model per step, the first with something to run
            elif plan.preempted:
                idle.append(plan)
        plans, idle = self._merge_foreign(plans, idle)
        if not plans:
            if idle and self._trace is not None:
                self._write_trace(t0, self.clock.now(), idle, [], marks)
            return outputs
        results = self.executor.execute(plans)
        now = self.clock.now()
        for plan, result in zip(plans, results):
            t = self.tenants[plan.model]
            outputs += self._commit(t, plan, result)
            t.state.last_run = now
            c = t.state.counters
            c.steps += 1
            c.h2d_bytes += result.h2d_bytes
            c.stream_copy_s += result.copy_s
            c.stream_exposed_s += result.exposed_s
            if self.remapper is not None and plan.seqs:
                self.remapper.observe_step(
                    t.name, result.elapsed - result.exposed_s, plan.num_prefill_tokens == 0
                )
        if self.remapper is not None:
            self._refresh_states()
            self.remapper.after_step()
        self._record_pages(now)
        if self._trace is not None:
            self._write_trace(t0, now, plans + idle, results, marks)
        return outputs

    @staticmethod
    def _remap_marks(t: Tenant) -> tuple[int, int]:
        c = t.state.counters
        return c.remapped_layers, c.restored_layers

    def revert_idle(self) -> int:
        """With no request anywhere, restore every remapped layer that memory allows (no
        hysteresis: there is no demand to wait out). Returns the layers restored; cheap when
        nothing is missing."""
        if self.remapper is None or not self.config.revert or self._idle_reverted:
            return 0
        if self.has_unfinished():
            return 0
        self._idle_reverted = True  # once per idle period: a failed restore is not retried in a loop
        return self.remapper.restore_all()

    def _refresh_states(self) -> None:
        for t in self.tenants.values():
            st = t.state
            st.num_running = len(t.scheduler.running)
            st.num_waiting = len(t.scheduler.waiting)
            active = t.scheduler.has_work
            st.layers_missing = len(t.weights.missing_layers)
            if active and not st.active and st.layers_missing:
                st.reactivating = True
            st.active = active
            st.kv_blocks_used = t.pool.num_used
            st.kv_pages = t.pool.num_pages

    def _make_room(self, requester: str, blocks: int, req: Request) -> bool:
        """Free arena pages for `requester`'s request `req`: idle KV pages (no live block) of other
        models, least recently run first; then (policy oneiros) remapped parameters; then, when
        `req` is running, another model's running request that is younger than every running
        request of the requester (the engine's youngest goes first, whichever model it belongs to,
        so that two models cannot keep preempting themselves for pages the other holds).
        True if any page was freed."""
        need = self.tenants[requester].pool.pages_needed(blocks) - self.arena.num_free
        freed = 0
        for name in reversed(self.store.mru_order()):
            if freed >= need:
                break
            if name != requester:
                freed += len(self.tenants[name].pool.shrink(need - freed))
        if freed < need and self.remapper is not None:
            # Parameter remapping: layer slabs become KV pages before anyone is preempted.
            freed += self.remapper.take(requester, need - freed)
        if freed < need:
            others = [
                t.scheduler for n, t in self.tenants.items()
                if n != requester and n not in self._planned
            ]
            more, _ = preempt_younger(
                self.tenants[requester].scheduler, others, req, need - freed, self._foreign_plan
            )
            freed += more
        return freed > 0

    def _can_wait(self, requester: str, req: Request) -> bool:
        """`req`, the youngest running request of `requester`, found no page: a younger running
        request of a model already planned this step holds pages `_make_room` could not take.
        `req` then waits (keeps its blocks) instead of preempting itself."""
        return any(
            r.age_key > req.age_key
            for name in self._planned if name != requester
            for r in self.tenants[name].scheduler.running
        )

    def _foreign_plan(self, sched: Scheduler) -> StepPlan:
        """The plan that carries this step's preemptions of `sched`'s requests made on behalf of
        another model (their swap-outs run before any forward pass of the step)."""
        plan = self._foreign.get(sched.model)
        if plan is None:
            plan = self._foreign[sched.model] = StepPlan(sched.model)
        return plan

    def _merge_foreign(
        self, plans: list[StepPlan], idle: list[StepPlan]
    ) -> tuple[list[StepPlan], list[StepPlan]]:
        """Fold preemptions made for another model into the victim model's plan of this step (its
        swap-outs first), or add a plan of their own: executed when it swaps out (copies only), else
        only traced. The executor runs every plan's copies before any forward pass."""
        for name, f in self._foreign.items():
            own = next((p for p in plans + idle if p.model == name), None)
            if own is not None:
                own.preempted[:0] = f.preempted
                own.swap_out[:0] = f.swap_out
                if own in idle and own.swap_out:
                    idle.remove(own)
                    plans.insert(0, own)
            elif f.swap_out:
                plans.insert(0, f)
            else:
                idle.append(f)
        self._foreign = {}
        return plans, idle

    def _remappable_pages(self) -> int:
        return self.remapper.remappable_pages() if self.remapper is not None else 0

    def _record_pages(self, now: float) -> None:
        self.store.page_history.append((now, self.arena.usage_by_kind()))

    def _write_trace(
        self,
        t0: float,
        t1: float,
        plans: list[StepPlan],
        results: list[StepResult],
        marks: dict[str, tuple[int, int]],
    ) -> None:
        """One JSON line per step: the plans (executed ones first, then empty plans that only
        preempted), the copies each made, remap/revert events of the step, and the page owners."""
        assert self._trace is not None
        events = {}
        for name, t in self.tenants.items():
            (r0, s0), (r1, s1) = marks[name], self._remap_marks(t)
            if (r1, s1) != (r0, s0):
                events[name] = {
                    "remapped": r1 - r0,
                    "restored": s1 - s0,
                    "layers_missing": len(t.weights.missing_layers),
                }
        rec = {
            "t": t0,
            "dt": t1 - t0,
            "plans": [
                {
                    "model": p.model,
                    "batch": len(p.seqs),
                    "prefill_tokens": p.num_prefill_tokens,
                    "decode_tokens": p.num_tokens - p.num_prefill_tokens,
                    "context_tokens": sum(s.context_len for s in p.seqs),
                    "sampled": sum(s.samples for s in p.seqs),
                    "attn_pairs": sum(s.attn_pairs for s in p.seqs),
                    "preempted": len(p.preempted),
                    "swap_out_blocks": len(p.swap_out),
                    "swap_in_blocks": len(p.swap_in),
                    "executed": r is not None,  # False: an empty plan that only preempted
                    "h2d_bytes": r.h2d_bytes if r is not None else 0,
                    "copy_s": r.copy_s if r is not None else 0.0,
                    "exposed_s": r.exposed_s if r is not None else 0.0,
                }
                for p, r in itertools.zip_longest(plans, results)
            ],
            "remap": events,
            "pages": self.arena.usage_by_kind(),
        }
        self._trace.write(json.dumps(rec) + "\n")
        self._trace.flush()

    def close(self) -> None:
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def _commit(self, t: Tenant, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        now = self.clock.now()
        index = {rid: k for k, rid in enumerate(result.request_ids)}
        outputs = []
        counters = t.state.counters
        counters.prefill_tokens += plan.num_prefill_tokens
        counters.decode_tokens += plan.num_tokens - plan.num_prefill_tokens
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
                text = self._texts.get(req.request_id)
                if text is None:
                    text = self._texts[req.request_id] = IncrementalText(t.tokenizer)
                req.output_text = text.update(req.output_token_ids)
            status = self._stop_status(t, req)
            if status is not None:
                t.scheduler.finish(req, status)
                outputs.append(self._finish(t, req))
            else:
                outputs.append(self._output(t, req))
        return outputs

    def _stop_status(self, t: Tenant, req: Request) -> RequestStatus | None:
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

    def _output(self, t: Tenant, req: Request) -> RequestOutput:
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

    def _finish(self, t: Tenant, req: Request) -> RequestOutput:
        self._requests.pop(req.request_id, None)
        self._texts.pop(req.request_id, None)
        self.executor.release(req.request_id)
        stopped_by_string = isinstance(req.stop_reason, str) and req.stop_reason in req.params.stop
        if t.tokenizer is not None and not stopped_by_string:
            req.output_text = t.tokenizer.decode(req.output_token_ids)
        return self._output(t, req)

    # ---- invariants -----------------------------------------------------------------------------
    def check_integrity(self) -> None:
        assert self._texts.keys() <= self._requests.keys(), "a detokeniser outlived its request"
        self.arena.check_integrity()
        for t in self.tenants.values():
            t.pool.check_integrity()
            t.scheduler.check_integrity()
