"""The torch backend: ModelRunner turns one model's plan into tensors and runs it; TorchExecutor
applies a step's memory actions (layer moves on the copy stream, KV swaps) and runs every plan."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from oneiros import attention as attention_backends
from oneiros.attention.torch_ref import AttentionMetadata, DecodeGroup, PrefillSeq, group_decodes
from oneiros.config import EngineConfig, free_device_memory
from oneiros.core import (
    ConfigError,
    MemoryOp,
    MoveKV,
    Request,
    ResizeKV,
    ScheduledSeq,
    Step,
    StepPlan,
    StepResult,
)
from oneiros.engine import faults
from oneiros.engine.backends import Backend, Executor
from oneiros.engine.clock import Clock
from oneiros.engine.graphs import CudaGraphCapture, DecodeGraphs, GraphCapture, batch_sizes
from oneiros.engine.sampler import Sampler
from oneiros.memory.bandwidth import cached_probe
from oneiros.memory.kv import KVPool
from oneiros.memory.passplan import PassPlan, plan_pass
from oneiros.memory.storage import DeviceArena
from oneiros.memory.streamer import LayerStreamer
from oneiros.memory.weights import ModelWeights

if TYPE_CHECKING:
    from oneiros.engine.policies import MemoryPolicy
    from oneiros.engine.tenant import Tenant


class ModelRunner:
    """Turns a plan into tensors for one model and runs it."""

    def __init__(
        self,
        weights: ModelWeights,
        pool: KVPool,
        storage: DeviceArena,
        sampler: Sampler,
        host_blocks: int = 0,
        prefetch_distance: int = 2,
        graph_sizes: list[int] | None = None,
        max_blocks: int = 0,
    ) -> None:
        model = weights.model
        c = model.cfg
        self.weights = weights
        self.residency = weights.residency
        self.model = model
        self.pool = pool
        self.prefetch_distance = prefetch_distance
        self.streamer = LayerStreamer(weights.host, weights.region, weights.bind, storage.device)
        self.stream_layers: tuple[int, ...] = ()  # the non-resident layers of the current pass
        self._landing: list[torch.cuda.Event] = []  # swap-ins issued a step ahead (CUDA)
        self._timing_at_start = (0.0, 0.0)
        self._timed = True  # the last pass's copy and wait times were measured
        self.sampler = sampler
        self.device = storage.device
        self.block_size = pool.block_size
        block_shape = (c.num_layers, 2, pool.block_size, c.num_kv_heads, c.head_dim)
        # [num_pages, blocks_per_page, layers, 2, block_size, Hkv, D] over the whole arena.
        self.kv = storage.kv_view(block_shape, model.dtype, pool.blocks_per_page)
        # Swap space for preempted requests' KV: [host_blocks, layers, 2, block_size, Hkv, D].
        pin = self.device.type == "cuda"
        self.host_kv = torch.empty((host_blocks, *block_shape), dtype=model.dtype, pin_memory=pin)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Decode steps from CUDA graphs (graph_sizes, on CUDA); `use_graphs` installs any capture.
        self.graphs: DecodeGraphs | None = None
        self._max_blocks = max_blocks
        if graph_sizes and self.device.type == "cuda":
            self.use_graphs(CudaGraphCapture(self.device), graph_sizes)

    def use_graphs(self, capture: GraphCapture, sizes: list[int], settle_steps: int = 2) -> None:
        self.graphs = DecodeGraphs(self, sizes, self._max_blocks, capture, settle_steps)

    def kv_layer(self, i: int) -> torch.Tensor:
        return self.kv[:, :, i]  # [P, bpp, 2, bs, Hkv, D]

    # ---- memory actions --------------------------------------------------------------------------
    def apply(self, op: MemoryOp) -> None:
        """Move the bytes of one layer action. The residency changes: copies in flight that
        depend on the old layout finish first (the streamer waits for them), captured graphs go."""
        self.streamer.reset()
        if self.graphs is not None:
            self.graphs.invalidate()
        # On CUDA a copy runs on the copy stream; the layer's next use waits for its event.
        self.weights.apply(op, self.streamer.copy_in)

    def move_kv(self, op: MoveKV) -> None:
        """Copy KV pages to their new places on the device (compaction; blocks keep their slot)."""
        faults.maybe("kv_move")  # fault injection (tests, drills): a failed move copies nothing
        src = torch.tensor(op.src, device=self.device)
        dst = torch.tensor(op.pages, device=self.device)
        self.kv[dst] = self.kv[src]

    def swap_out(self, plan: StepPlan) -> None:
        """Copy the plan's swapped-out blocks to host memory (before anything reuses them)."""
        bpp = self.pool.blocks_per_page
        if plan.swap_out:
            dev = torch.tensor([d for d, _ in plan.swap_out])
            host = torch.tensor([h for _, h in plan.swap_out])
            blocks = self.kv[(dev // bpp).to(self.device), (dev % bpp).to(self.device)]
            self.host_kv[host] = blocks.to("cpu")

    def swap_in(self, plan: StepPlan, ahead: bool = False) -> None:
        """Copy swapped-in blocks back from host memory into their new device blocks. `ahead`
        (policy pie): the requests run from the next step, so on CUDA the copy goes to the copy
        stream, overlapped with this step, and the next pass waits for it."""
        bpp = self.pool.blocks_per_page
        if not plan.swap_in:
            return
        host = torch.tensor([h for h, _ in plan.swap_in])
        dev = torch.tensor([d for _, d in plan.swap_in])
        copy_stream = self.streamer.copy_stream
        if ahead and copy_stream is not None:
            freed = torch.cuda.Event()
            freed.record(torch.cuda.current_stream(self.device))  # the blocks' last readers
            copy_stream.wait_event(freed)
            with torch.cuda.stream(copy_stream):
                blocks = self.host_kv[host].to(self.device, non_blocking=True)
                self.kv[(dev // bpp).to(self.device), (dev % bpp).to(self.device)] = blocks
                landed = torch.cuda.Event()
                landed.record()
            self._landing.append(landed)
            return
        blocks = self.host_kv[host].to(self.device, non_blocking=True)
        self.kv[(dev // bpp).to(self.device), (dev % bpp).to(self.device)] = blocks

    def forward(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[Request]]:
        """The forward pass (after the executor ran the step's copies); returns logits [N, V] of the
        sampling rows and their requests."""
        st = self.streamer.stats
        self._timing_at_start = (st.copy_s, st.exposed_s)
        self._timed = True
        self.stream_layers = plan.stream
        for landed in self._landing:  # swap-ins issued a step ahead must have landed
            torch.cuda.current_stream(self.device).wait_event(landed)
        self._landing.clear()
        with torch.inference_mode():
            if not plan.seqs:
                return None, []
            # Decodes (one new token) first, shortest context first: they are attended in a few
            # batched calls over groups of similar length.
            seqs = sorted(plan.seqs, key=lambda s: (s.num_new_tokens != 1, s.context_len))
            key = self.graphs.key_for(seqs) if self.graphs is not None else None
            # copies inside a replayed graph are not timed: the step is not a measurement
            self._timed = key is None or not (self.stream_layers or self.streamer.pending)
            if key is not None:
                h = self.graphs.run(seqs, key)
            else:
                ids, pos, meta = self._prepare(seqs)
                before, after = self.stream_hooks()
                h = self.model.forward(ids, pos, self.kv_layer, meta, before, after)
            rows, reqs, offset = [], [], 0
            for s in seqs:
                offset += s.num_new_tokens
                if s.samples:
                    rows.append(offset - 1)
                    reqs.append(s.request)
            if not rows:
                return None, []
            if len(rows) < h.shape[0]:
                pack = _HostPack()
                sel = pack.add(rows)
                h = h[pack.to(self.device)[sel]]
            return self.model.lm_head(h), reqs

    def pass_plan(self) -> PassPlan | None:
        """The current pass's streaming plan (None: every layer resident)."""
        if not self.stream_layers:
            return None
        return plan_pass(self.model.cfg.num_layers, self.stream_layers, self.prefetch_distance)

    def stream_hooks(self, capturing: bool = False):
        """(before, after): hooks that stream the pass's non-resident layers through borrowed
        slabs and wait for restores still in flight; (None, None) when there are neither. The
        residency changed since the last pass only through `apply`, which already waited for
        the old plan's copies."""
        plan = self.pass_plan()
        if plan is None and not self.streamer.pending:
            return None, None
        plan = plan or plan_pass(self.model.cfg.num_layers, (), self.prefetch_distance)
        return self.streamer.hooks(plan, timing=not capturing)

    def sample(
        self, plan: StepPlan, logits: torch.Tensor | None, reqs: list[Request], t0: float
    ) -> StepResult:
        tokens: list[int] = []
        logprobs: list[float] = []
        top = None
        if logits is not None:
            with torch.inference_mode():
                tokens, logprobs, top = self.sampler.sample(logits, reqs)  # syncs the device
        self.streamer.finish_pass()
        st, before = self.streamer.stats, self._timing_at_start
        passes = self.pass_plan() if plan.seqs else None
        return StepResult(
            [r.request_id for r in reqs],
            tokens,
            logprobs,
            top,
            time.perf_counter() - t0,
            h2d_bytes=passes.num_copies * self.residency.layer_bytes if passes else 0,
            copy_s=st.copy_s - before[0],
            exposed_s=st.exposed_s - before[1],
            timed=self._timed,
        )

    def _prepare(
        self, seqs: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token ids, positions and attention metadata of a step, sent to the device in one copy."""
        bs, bpp = self.block_size, self.pool.blocks_per_page
        pack = _HostPack()
        ids: list[int] = []
        pos: list[int] = []
        w_pages: list[int] = []
        w_slots: list[int] = []
        w_off: list[int] = []
        decode: list[ScheduledSeq] = []
        prefills: list[tuple[int, int, int, int, int]] = []  # (start, q_len, ctx, pages, slots)
        for s in seqs:
            req = s.request
            ids.extend(req.tokens(s.start, s.context_len))
            for j in range(s.start, s.context_len):
                pos.append(j)
                b = req.block_ids[j // bs]
                w_pages.append(b // bpp)
                w_slots.append(b % bpp)
                w_off.append(j % bs)
            if s.num_new_tokens == 1:
                decode.append(s)
            else:
                blocks = req.block_ids[: -(-s.context_len // bs)]
                prefills.append((
                    len(ids) - s.num_new_tokens, s.num_new_tokens, s.context_len,
                    pack.add([b // bpp for b in blocks]), pack.add([b % bpp for b in blocks]),
                ))
        fields = [pack.add(x) for x in (ids, pos, w_pages, w_slots, w_off)]
        num_blocks = [-(-s.context_len // bs) for s in decode]
        groups = []
        for a, b in group_decodes(num_blocks):
            nb = num_blocks[b - 1]
            pages: list[int] = []
            slots: list[int] = []
            for s in decode[a:b]:
                # Padding repeats the sequence's first block: KV bytes, finite, masked out.
                row = s.request.block_ids[: -(-s.context_len // bs)]
                row = row + [row[0]] * (nb - len(row))
                pages.extend(x // bpp for x in row)
                slots.extend(x % bpp for x in row)
            lens = [s.context_len for s in decode[a:b]]
            full = min(lens) == nb * bs
            groups.append((a, b - a, nb, pack.add(pages), pack.add(slots), pack.add(lens), full))
        dev = pack.to(self.device)
        ids_t, pos_t, wp, ws, wo = (dev[i] for i in fields)
        meta = AttentionMetadata(
            write_pages=wp, write_slots=ws, write_offsets=wo, num_decode=len(decode),
            decode_groups=[], prefills=[
                PrefillSeq(start, q, ctx, dev[p], dev[sl]) for start, q, ctx, p, sl in prefills
            ],
        )
        needs_mask = getattr(self.model.attention, "DECODE_MASK", True)
        for a, g, nb, p, sl, ln, full in groups:
            lens = dev[ln]
            mask = None
            if needs_mask and not full:
                keys = torch.arange(nb * bs, device=self.device)
                mask = (keys[None, :] < lens[:, None])[:, None, None, :]
            meta.decode_groups.append(
                DecodeGroup(a, dev[p].view(g, nb), dev[sl].view(g, nb), mask, lens)
            )
        return ids_t, pos_t, meta


class _HostPack:
    """Integer lists packed into one host buffer (pinned on CUDA) and sent with one copy; each
    list comes back as a slice of the device tensor."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def add(self, xs: list[int]) -> slice:
        start = len(self.values)
        self.values.extend(xs)
        return slice(start, len(self.values))

    def to(self, device: torch.device) -> torch.Tensor:
        host = torch.tensor(self.values, dtype=torch.long)
        if device.type != "cuda":
            return host
        return host.pin_memory().to(device, non_blocking=True)


class TorchExecutor(Executor):
    """The real executor: one ModelRunner per model, all reading weights and KV from one arena."""

    def __init__(self, runners: dict[str, ModelRunner], swap_in_ahead: bool = False) -> None:
        self.runners = runners
        self.swap_in_ahead = swap_in_ahead

    def execute(self, step: Step) -> list[StepResult]:
        plans = step.plans
        # Memory first, in an order that respects every action's view of the pages: KV page
        # moves (planned before any swap of the step, onto pages free until then), swap-outs
        # read blocks freed while planning (before anything writes them), layer actions go in
        # the order they were decided, swap-ins write blocks nothing later in the step takes.
        with torch.inference_mode():
            moves = [op for op in step.memory if isinstance(op, MoveKV)]
            if moves:
                for runner in self.runners.values():
                    runner.streamer.order_after_copies()
                for op in moves:
                    self.runners[op.model].move_kv(op)
            for plan in plans:
                self.runners[plan.model].swap_out(plan)
            for op in step.memory:
                if not isinstance(op, (ResizeKV, MoveKV)):
                    self.runners[op.model].apply(op)
            for plan in plans:
                self.runners[plan.model].swap_in(plan, self.swap_in_ahead)
        if not plans:
            return []
        t0 = time.perf_counter()  # each result's elapsed: its pass and sampling, copies excluded
        runners = [self.runners[p.model] for p in plans]
        # Spatial sharing on CUDA: each model's kernels go to its own stream, all of them ordered
        # after what the main stream did before and joined back into it before sampling.
        streams = len(plans) > 1 and all(r.stream is not None for r in runners)
        main = torch.cuda.current_stream(runners[0].device) if streams else None
        pending = []
        for plan, runner in zip(plans, runners):
            if streams:
                runner.stream.wait_stream(main)
                with torch.cuda.stream(runner.stream):
                    pending.append((plan, runner, *runner.forward(plan)))
            else:
                pending.append((plan, runner, *runner.forward(plan)))
        if streams:
            for runner in runners:
                main.wait_stream(runner.stream)
        return [runner.sample(plan, logits, reqs, t0) for plan, runner, logits, reqs in pending]

    def release(self, request_id: str) -> None:
        for r in self.runners.values():
            r.sampler.release(request_id)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use cpu or cuda[:N])") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device cuda was asked for but CUDA is not available here; use --device cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported (use cpu or cuda[:N])")
    return dev


class TorchBackend(Backend):
    """The models run for real, on cpu or cuda, against the wall clock."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = _device(config.device)
        self.clock = Clock()
        self.attention = "torch"

    def default_dtype(self) -> str:
        return "bfloat16" if self.device.type == "cuda" else "float32"

    def device_memory(self) -> int:
        return free_device_memory(str(self.device))

    def h2d_bytes_per_s(self) -> float:
        return self.config.h2d_bytes_per_s or cached_probe(self.device).h2d

    def prepare_models(self, models: dict[str, Any]) -> None:
        self.attention = attention_backends.choose(
            self.config.attention, self.device.type, self.config.block_size,
            [m.cfg.head_dim for m in models.values()],
        )
        backend = attention_backends.load(self.attention)
        for m in models.values():
            m.attention = backend

    def loads_weights(self) -> bool:
        return True

    def executor(
        self, tenants: dict[str, Tenant], weights: dict[str, Any], policy: MemoryPolicy
    ) -> Executor:
        cfg = self.config
        storage = next(iter(weights.values())).storage
        return TorchExecutor({
            n: ModelRunner(
                weights[n],
                t.pool,
                storage,
                Sampler(self.device, cfg.seed),
                t.scheduler.host_pool.num_blocks if t.scheduler.host_pool else 0,
                cfg.prefetch_distance,
                batch_sizes(cfg.max_num_seqs) if cfg.cuda_graphs else None,
                -(-t.max_model_len // cfg.block_size),
            )
            for n, t in tenants.items()
        }, swap_in_ahead=policy.async_swap_in)
