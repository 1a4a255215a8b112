"""Executors run one `StepPlan`. The real one runs the PyTorch model; a simulated one (same
interface) advances a virtual clock instead."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import torch

from oneiros.attention.torch_ref import AttentionMetadata, DecodeGroup, PrefillSeq, group_decodes
from oneiros.core import Request, ScheduledSeq, StepPlan, StepResult
from oneiros.engine.graphs import CudaGraphCapture, DecodeGraphs, GraphCapture
from oneiros.engine.sampler import Sampler
from oneiros.memory.kv import KVPool
from oneiros.memory.storage import DeviceArena
from oneiros.memory.transfer import LayerStreamer, PassPlan, plan_pass
from oneiros.memory.weights import ModelWeights


class Executor(ABC):
    @abstractmethod
    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        """Run each plan (one per model in this step): its KV copies, its forward pass, and sample
        one token per sequence that reaches its end. Plans of different models may overlap."""

    def release(self, request_id: str) -> None:
        """Forget per-request state (e.g. a seeded generator) of a finished request."""

    def residency_changed(self, model: str) -> None:
        """The model's resident layers are about to change: finish what depends on the old set."""


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
        self.model = model
        self.pool = pool
        self.prefetch_distance = prefetch_distance
        self.streamer = LayerStreamer(weights.host, weights.region, weights.bind, storage.device)
        weights.copier = self.streamer.copy_in  # restores and moves overlap compute on CUDA
        self._pass_plan: PassPlan | None = None
        self._stats_at_start = (0, 0.0, 0.0)
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

    def copy_blocks(self, plan: StepPlan) -> None:
        """Swap-outs before swap-ins: a block swapped out may be reused by this very step."""
        bpp = self.pool.blocks_per_page
        if plan.swap_out:
            dev = torch.tensor([d for d, _ in plan.swap_out])
            host = torch.tensor([h for _, h in plan.swap_out])
            blocks = self.kv[(dev // bpp).to(self.device), (dev % bpp).to(self.device)]
            self.host_kv[host] = blocks.to("cpu")
        if plan.swap_in:
            host = torch.tensor([h for h, _ in plan.swap_in])
            dev = torch.tensor([d for _, d in plan.swap_in])
            blocks = self.host_kv[host].to(self.device, non_blocking=True)
            self.kv[(dev // bpp).to(self.device), (dev % bpp).to(self.device)] = blocks

    def forward(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[Request]]:
        """The forward pass (after the executor ran the step's copies); returns logits [N, V] of the
        sampling rows and their requests."""
        st = self.streamer.stats
        self._stats_at_start = (st.bytes, st.copy_s, st.exposed_s)
        with torch.inference_mode():
            if not plan.seqs:
                return None, []
            # Decodes (one new token) first, shortest context first: they are attended in a few
            # batched calls over groups of similar length.
            seqs = sorted(plan.seqs, key=lambda s: (s.num_new_tokens != 1, s.context_len))
            key = self.graphs.key_for(seqs) if self.graphs is not None else None
            if key is not None:
                h = self.graphs.run(seqs, key)
            else:
                ids, pos, meta = self._prepare(seqs)
                before, after, _ = self.stream_hooks()
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

    def stream_hooks(self, capturing: bool = False):
        """(before, after, pass plan): hooks that stream the model's non-resident layers through
        borrowed slabs and wait for restores still in flight; (None, None, None) when there are
        neither. The residency changed since the last plan only through `reset` (see
        TorchExecutor.residency_changed), which already waited for the old plan's copies."""
        missing = tuple(self.weights.missing_layers)
        if not missing and not self.streamer.pending:
            self._pass_plan = None
            return None, None, None
        if self._pass_plan is None or self._pass_plan.missing != missing:
            n = len(self.weights.slab_pages)
            self._pass_plan = plan_pass(n, missing, self.prefetch_distance)
        before, after = self.streamer.hooks(self._pass_plan, timing=not capturing)
        return before, after, self._pass_plan

    def sample(self, logits: torch.Tensor | None, reqs: list[Request], t0: float) -> StepResult:
        tokens: list[int] = []
        logprobs: list[float] = []
        top = None
        if logits is not None:
            with torch.inference_mode():
                tokens, logprobs, top = self.sampler.sample(logits, reqs)  # syncs the device
        self.streamer.finish_pass()
        st, before = self.streamer.stats, self._stats_at_start
        return StepResult(
            [r.request_id for r in reqs],
            tokens,
            logprobs,
            top,
            time.perf_counter() - t0,
            h2d_bytes=st.bytes - before[0],
            copy_s=st.copy_s - before[1],
            exposed_s=st.exposed_s - before[2],
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
            ids.extend(req.all_token_ids[s.start : s.context_len])
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

    def __init__(self, runners: dict[str, ModelRunner]) -> None:
        self.runners = runners

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        t0 = time.perf_counter()
        runners = [self.runners[p.model] for p in plans]
        # Spatial sharing on CUDA: each model's kernels go to its own stream, all of them ordered
        # after what the main stream did before and joined back into it before sampling.
        streams = len(plans) > 1 and all(r.stream is not None for r in runners)
        main = torch.cuda.current_stream(runners[0].device) if streams else None
        # Every plan's KV copies first, in order: a block swapped out for one model may be written
        # by another model's forward pass in this very step.
        with torch.inference_mode():
            for plan, runner in zip(plans, runners):
                runner.copy_blocks(plan)
        pending = []
        for plan, runner in zip(plans, runners):
            if streams:
                runner.stream.wait_stream(main)
                with torch.cuda.stream(runner.stream):
                    pending.append((runner, *runner.forward(plan)))
            else:
                pending.append((runner, *runner.forward(plan)))
        if streams:
            for runner in runners:
                main.wait_stream(runner.stream)
        return [runner.sample(logits, reqs, t0) for runner, logits, reqs in pending]

    def residency_changed(self, model: str) -> None:
        runner = self.runners[model]
        runner.streamer.reset()
        runner._pass_plan = None
        if runner.graphs is not None:
            runner.graphs.invalidate()

    def release(self, request_id: str) -> None:
        for r in self.runners.values():
            r.sampler.release(request_id)
