"""Small factories for unit tests: requests, pools and schedulers without tensors or weights.

    from tests.factories import make_request, make_scheduler

Every factory takes keyword overrides so a test states only what it cares about.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from oneiros.core import Request, RequestStatus, SamplingParams, StepPlan
from oneiros.engine.scheduler import Scheduler
from oneiros.memory.arena import PageArena
from oneiros.memory.kv import KVPool

if TYPE_CHECKING:
    from oneiros.engine.tenant import Tenant

_tokens = itertools.count(1)


def make_params(**overrides) -> SamplingParams:
    """SamplingParams with greedy decoding and 16 tokens unless told otherwise."""
    kw = {"max_tokens": 16, "temperature": 0.0}
    kw.update(overrides)
    return SamplingParams(**kw)


def make_request(
    prompt_len: int = 8,
    max_tokens: int = 16,
    *,
    model: str = "default",
    request_id: str | None = None,
    prompt_token_ids: list[int] | None = None,
    **params,
) -> Request:
    """A request with `prompt_len` distinct token ids (or the given ones) and max_tokens."""
    ids = list(prompt_token_ids) if prompt_token_ids is not None else [
        next(_tokens) % 50_000 for _ in range(prompt_len)
    ]
    req = Request(ids, make_params(max_tokens=max_tokens, **params), model)
    if request_id is not None:
        req.request_id = request_id
    return req


def make_arena(num_pages: int = 16, page_bytes: int = 4096) -> PageArena:
    return PageArena(num_pages, page_bytes)


def make_pool(
    model: str = "default",
    *,
    arena: PageArena | None = None,
    num_pages: int = 16,
    page_bytes: int = 4096,
    block_bytes: int = 1024,
    block_size: int = 4,
    prefix_caching: bool = False,
) -> KVPool:
    """A KV pool on `arena` (a fresh one of num_pages x page_bytes when None)."""
    arena = arena if arena is not None else PageArena(num_pages, page_bytes)
    return KVPool(model, arena, block_bytes, block_size, prefix_caching)


def make_scheduler(
    num_pages: int = 4,
    page_bytes: int = 4096,
    block_bytes: int = 1024,
    block_size: int = 4,
    *,
    model: str = "default",
    arena: PageArena | None = None,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    prefix_caching: bool = False,
    **scheduler_kwargs,
) -> Scheduler:
    """A scheduler over its own KV pool. With `arena`, the pool shares it (num_pages and page_bytes
    are then ignored). Reach the pool as `sched.pool` and the arena as `sched.pool.arena`.
    Other keywords (preemption, host_pool, make_room, ...) go to Scheduler as they are."""
    pool = make_pool(
        model,
        arena=arena,
        num_pages=num_pages,
        page_bytes=page_bytes,
        block_bytes=block_bytes,
        block_size=block_size,
        prefix_caching=prefix_caching,
    )
    return Scheduler(
        model, pool, max_num_seqs, max_num_batched_tokens, max_model_len, **scheduler_kwargs
    )


# ---- a hand-driven engine loop (no executor, no tensors) -------------------------------------------
@dataclass
class SimStats:
    steps: int = 0
    empty_steps: int = 0
    preemptions: int = 0
    finished: list[Request] = field(default_factory=list)


def commit(sched: Scheduler, plan: StepPlan, next_token: int = 7) -> list[Request]:
    """What the engine's commit does, minus the executor: advance num_computed_tokens, append one
    token to every sampling seq, finish requests at max_tokens or at the context window.
    Returns the requests finished by this commit."""
    done = []
    for s in plan.seqs:
        req = s.request
        req.num_computed_tokens += s.num_new_tokens
        if not s.samples:
            continue
        req.output_token_ids.append(next_token)
        if (
            len(req.output_token_ids) >= req.params.max_tokens
            or req.num_tokens >= sched.max_model_len
        ):
            sched.finish(req, RequestStatus.FINISHED_LENGTH)
            done.append(req)
    return done


def step(sched: Scheduler, stats: SimStats | None = None) -> tuple[StepPlan, list[Request]]:
    """schedule -> commit. Returns the plan and the requests that finished in this step (those
    the scheduler gave up on for KV capacity included)."""
    plan = sched.schedule()
    finished = list(sched.finished_in_schedule)
    sched.finished_in_schedule.clear()
    finished += commit(sched, plan)
    if stats is not None:
        stats.steps += 1
        stats.empty_steps += plan.empty
        stats.preemptions += len(plan.preempted)
        stats.finished += finished
    return plan, finished


# ---- tenants without models: accounting, scheduler and metadata only ---------------------------------
def make_tenants(
    arena: PageArena,
    layers: dict[str, int],
    *,
    layer_pages: int = 2,
    block_bytes: int | None = None,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    preemption: str = "recompute",
    oversubscribed: bool = False,
    prefix_caching: bool = False,
) -> dict[str, Tenant]:
    """Torch-free tenants on `arena`: model name -> number of decoder layers, each layer a slab of
    `layer_pages` pages, one resident page per model, every parameter placed (in order), or with
    `oversubscribed` as the engine places more weights than fit (`engine/placement.py`)."""
    from oneiros.engine.placement import place
    from oneiros.engine.tenancy import MetadataStore
    from oneiros.engine.tenant import Tenant
    from oneiros.memory.residency import LayerResidency
    from oneiros.memory.swap import HostBlockPool

    page = arena.page_bytes
    store = MetadataStore(list(layers))
    tenants = {}
    for name, n in layers.items():
        res = LayerResidency(name, arena, n, layer_pages * page, page)
        pool = KVPool(name, arena, block_bytes or page // 4, block_size, prefix_caching)
        host = HostBlockPool(name, 64, pool.block_bytes) if preemption == "swap" else None
        sched = Scheduler(
            name, pool, max_num_seqs, max_num_batched_tokens, max_model_len,
            preemption=preemption, host_pool=host,
        )
        tenants[name] = Tenant(name, res, pool, sched, store.states[name], max_model_len, 50_000)
    place(list(tenants.values()), oversubscribed)
    return tenants


def make_planning(tenants: dict[str, Tenant], *, remap: bool = True, sharing: str = "temporal",
                  h2d_bytes_per_s: float = float("inf"), admit_remap_after_s: float | None = None,
                  **remap_kw):
    """The engine's planning components over torch-free tenants: (store, arbiter, controller,
    planner). The store is the one the tenants' states belong to."""
    from oneiros.engine.arbiter import Arbiter
    from oneiros.engine.planner import Planner
    from oneiros.engine.remapping import RemapController
    from oneiros.engine.tenancy import MetadataStore, TenancyPolicy

    arena = next(iter(tenants.values())).pool.arena
    store = MetadataStore(list(tenants))
    store.states = {n: t.state for n, t in tenants.items()}
    arbiter = Arbiter({n: t.scheduler for n, t in tenants.items()}, store,
                      admit_remap_after_s=admit_remap_after_s)
    controller = None
    if remap:
        kw = dict(max_remap_fraction=0.9, revert_reserve=0.25, revert_hold_steps=2,
                  prefetch_distance=2)
        kw.update(remap_kw)
        controller = RemapController(
            tenants, arena, sharing, kw.pop("max_remap_fraction"), kw.pop("revert_reserve"),
            kw.pop("revert_hold_steps"), h2d_bytes_per_s, **kw,
        )
        arbiter.remap = controller
    for t in tenants.values():
        t.scheduler.arbiter = arbiter
    planner = Planner(tenants, store, TenancyPolicy(sharing, 1e9), arbiter, controller)
    return store, arbiter, controller, planner
