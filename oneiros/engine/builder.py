"""Building an engine from its config: the backend, the models, one arena of pages, each tenant's
accounting and scheduler, the arbiter, the remapping controller (policy oneiros) and the executor."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch

from oneiros.config import EngineConfig, MiB
from oneiros.core import ConfigError
from oneiros.engine.arbiter import Arbiter
from oneiros.engine.backends import Backend, Executor, create_backend
from oneiros.engine.executor import torch_dtype
from oneiros.engine.planner import Planner
from oneiros.engine.placement import host_tiers, place
from oneiros.engine.policies import MemoryPolicy, memory_policy
from oneiros.engine.remapping import RemapController
from oneiros.engine.scheduler import Scheduler
from oneiros.engine.tenancy import MetadataStore, TenancyPolicy
from oneiros.engine.tenant import Tenant
from oneiros.engine.tokenizer import Tokenizer
from oneiros.memory.arena import PageArena
from oneiros.memory.kv import KVPool
from oneiros.memory.storage import DeviceArena
from oneiros.memory.swap import HostBlockPool
from oneiros.memory.weights import ModelWeights, layouts, make_residency, weight_pages
from oneiros.models.base import DecoderModel
from oneiros.models.loader import ModelSource, resolve
from oneiros.models.registry import build_model

logger = logging.getLogger("oneiros.engine")


class EngineParts(NamedTuple):
    policy: MemoryPolicy
    backend: Backend
    dtype: torch.dtype
    arena: PageArena
    tenants: dict[str, Tenant]
    weights: dict[str, ModelWeights]  # empty when the backend loads no weights (the simulator)
    storage: DeviceArena | None  # the arena's bytes (None: the simulator has none)
    store: MetadataStore
    planner: Planner
    executor: Executor
    oversubscribed: bool  # the weights do not all fit: some models start off the GPU


def build(config: EngineConfig) -> EngineParts:
    policy = memory_policy(config)
    backend = create_backend(config)
    dtype = torch_dtype(config.dtype if config.dtype != "auto" else backend.default_dtype())
    sources = {name: resolve(src) for name, src in config.models.items()}
    models = {n: build_model(s.config, dtype, backend.device) for n, s in sources.items()}
    backend.prepare_models(models)
    page = config.page_bytes or auto_page_bytes(config, models.values(), dtype)
    weight_bytes = sum(weight_pages(m, page) for m in models.values()) * page
    floor = min_budget(models.values(), page) if policy.remaps else None
    arena = PageArena(budget(config, backend, weight_bytes, page, floor) // page, page)
    oversubscribed = arena.num_pages < weight_bytes // page + 1
    store = MetadataStore(list(models))
    schedulers: dict[str, Scheduler] = {}
    arbiter = Arbiter(
        schedulers, store, policy.shares_memory, remap_on_admit=config.remap_on_admit,
        admit_remap_after_s=config.admit_remap_after_s,
    )
    tenants = {
        n: tenant(config, policy, n, sources[n], m, arena, store, arbiter, dtype)
        for n, m in models.items()
    }
    schedulers.update({n: t.scheduler for n, t in tenants.items()})
    cold = host_tiers(
        {n: t.num_layers * t.residency.layer_bytes for n, t in tenants.items()},
        backend.host_memory_bytes(),
    )
    for n in cold:
        tenants[n].cold = True
    if cold:
        logger.warning(
            "host memory budget holds the pinned copies of %d of %d models; %s read from the "
            "cold tier (a memory-mapped file) when their layers come back",
            len(tenants) - len(cold), len(tenants), ", ".join(sorted(cold)),
        )
    place(list(tenants.values()), oversubscribed)
    weights: dict[str, ModelWeights] = {}
    storage = None
    if backend.loads_weights():
        storage = DeviceArena(arena.num_pages, page, backend.device)
        for n, t in tenants.items():
            weights[n] = ModelWeights(t.residency, models[n], storage)
            weights[n].load(sources[n], cold=t.cold)
    if policy.partitions_kv:
        split_kv(tenants, arena)
    for t in tenants.values():  # of the KV cache at start-up: its partition, or the shared pages
        pages = t.pool.num_pages if policy.partitions_kv else arena.num_free
        t.scheduler.watermark_blocks = int(config.kv_watermark * pages * t.pool.blocks_per_page)
        t.scheduler.growth_reserve_tokens = config.growth_reserve
    remap = None
    if policy.remaps:
        remap = RemapController(
            tenants, arena, config.sharing, config.max_remap_fraction, config.revert_reserve,
            config.revert_hold_steps, backend.h2d_bytes_per_s(), config.donor_order,
            config.revert, config.prefetch_distance, config.stream_exposure_target,
            config.cap_waiting, oversubscribed, policy.whole_models,
            copy_bytes_per_s={n: backend.cold_bytes_per_s() for n in cold},
            turn_reload=config.sharing == "temporal" and not policy.whole_models and (
                config.turn_reload == "on" or (config.turn_reload == "auto" and oversubscribed)
            ),
        )
        arbiter.remap = remap
    tenancy = TenancyPolicy(
        config.sharing, config.max_wait_s, config.turn_steps, config.turn_max_s
    )
    tenancy.fresh_first = remap is not None and remap.turn_reload
    planner = Planner(tenants, store, tenancy, arbiter, remap)
    executor = backend.executor(tenants, weights, policy)
    return EngineParts(
        policy, backend, dtype, arena, tenants, weights, storage, store, planner, executor,
        oversubscribed,
    )


def auto_page_bytes(config: EngineConfig, models: Any, dtype: torch.dtype) -> int:
    """2 MiB, or the smallest power of two that holds one KV block of the largest model."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    block = max(config.block_size * m.cfg.kv_bytes_per_token(itemsize) for m in models)
    return max(2 * MiB, 1 << (block - 1).bit_length())


def min_budget(models: Any, page: int) -> int:
    """The least an oversubscribed arena needs: every model's always-resident run, the layers of
    the largest model (so that any one model can run with every layer resident) and a KV page."""
    resident = layers = 0
    for m in models:
        layer, res = layouts(m)
        resident += res.pages(page)
        layers = max(layers, m.cfg.num_layers * layer.pages(page))
    return (resident + layers + 1) * page


def budget(
    config: EngineConfig, backend: Backend, weight_bytes: int, page: int, floor: int | None = None
) -> int:
    """The arena's bytes: the configured budget (bytes, or a fraction of device memory). Below
    the weights, a policy that remaps (`floor` given) serves oversubscribed, with a warning:
    every layer has an exact host copy, so models that do not fit start off the GPU."""
    b = config.memory_budget
    if b is None:
        b = weight_bytes + 1024 * MiB if backend.device.type == "cpu" else 0.9
    if isinstance(b, float):
        if not 0.0 < b <= 1.0:
            raise ConfigError(f"a fractional memory budget must be in (0, 1], got {b}")
        b = int(b * backend.device_memory())
    if b < weight_bytes + page and floor is not None and b >= floor:
        logger.warning(
            "memory budget of %.0f MiB is below the %.0f MiB the weights need: serving "
            "oversubscribed (models that do not fit start off the GPU and are loaded from their "
            "host copies when used)", b / MiB, weight_bytes / MiB,
        )
    elif b < weight_bytes + page and floor is not None:
        raise ConfigError(
            f"memory budget of {b / MiB:.0f} MiB is too small: even oversubscribed, the resident "
            f"parts of every model, the largest model's layers and one KV page need "
            f"{floor / MiB:.0f} MiB (the weights alone need {weight_bytes / MiB:.0f} MiB)"
        )
    elif b < weight_bytes + page:
        raise ConfigError(
            f"memory budget of {b / MiB:.0f} MiB is too small: the weights alone need "
            f"{weight_bytes / MiB:.0f} MiB, plus at least one page for KV cache"
        )
    return int(b)


def tenant(
    config: EngineConfig,
    policy: MemoryPolicy,
    name: str,
    source: ModelSource,
    model: DecoderModel,
    arena: PageArena,
    store: MetadataStore,
    arbiter: Arbiter,
    dtype: torch.dtype,
) -> Tenant:
    c = model.cfg
    residency = make_residency(name, model, arena)
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_bytes = config.block_size * c.kv_bytes_per_token(itemsize)
    pool = KVPool(name, arena, block_bytes, config.block_size, config.prefix_caching)
    max_len = min(config.max_model_len or c.max_position_embeddings, c.max_position_embeddings)
    host_pool = None
    if policy.preemption == "swap":
        share = config.swap_space // len(config.models)
        host_pool = HostBlockPool(name, share // block_bytes, block_bytes)
    sched = Scheduler(
        name, pool, config.max_num_seqs, config.max_num_batched_tokens, max_len,
        preemption=policy.preemption, host_pool=host_pool, arbiter=arbiter,
        swap_in_ahead=policy.async_swap_in,
    )
    tok = Tokenizer(source.tokenizer_dir) if source.tokenizer_dir else None
    eos = set(c.eos_token_ids)
    if tok is not None and tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    return Tenant(
        name, residency, pool, sched, store.states[name], max_len, c.vocab_size, tok,
        frozenset(eos), source, model,
    )


def split_kv(tenants: dict[str, Tenant], arena: PageArena) -> None:
    """Static policy: every free page goes to some model's KV pool now, in equal shares, so no
    model can ever use another's (one engine per model with a memory fraction, in effect)."""
    pools = [t.pool for t in tenants.values()]
    free = arena.num_free
    for k, pool in enumerate(pools):
        share = free // len(pools) + (1 if k < free % len(pools) else 0)
        if share and not pool.grow(share):
            raise ConfigError("could not split the KV pages between models")
