"""Executors run one `StepPlan`. The real one runs the PyTorch model; a simulated one (same
interface) advances a virtual clock instead."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import torch

from oneiros.attention.torch_ref import AttentionMetadata, DecodeGroup, PrefillSeq, group_decodes
from oneiros.core import Request, ScheduledSeq, StepPlan, StepResult
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
    ) -> None:
        model = weights.model
        c = model.cfg
        self.weights = weights
        self.model = model
        self.pool = pool
        self.prefetch_distance = prefetch_distance
        self.streamer = LayerStreamer(weights.host, weights.region, weights.bind, storage.device)
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
            ids, pos, meta = self._prepare(seqs)
            before, after = self._stream_hooks()
            h = self.model.forward(ids, pos, self.kv_layer, meta, before, after)
            rows, reqs, offset = [], [], 0
            for s in seqs:
                offset += s.num_new_tokens
                if s.samples:
                    rows.append(offset - 1)
                    reqs.append(s.request)
            if not rows:
                return None, []
            return self.model.lm_head(h[torch.tensor(rows, device=self.device)]), reqs

    def _stream_hooks(self):
        """Hooks that stream the model's non-resident layers through borrowed slabs (or none)."""
        missing = tuple(self.weights.missing_layers)
        if not missing:
            self._pass_plan = None
            return None, None
        if self._pass_plan is None or self._pass_plan.missing != missing:
            self.streamer.reset()
            self._pass_plan = plan_pass(len(self.weights.slab_pages), missing, self.prefetch_distance)
        return self.streamer.hooks(self._pass_plan)

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
        bs, bpp = self.block_size, self.pool.blocks_per_page
        ids: list[int] = []
        pos: list[int] = []
        w_blocks: list[int] = []
        w_off: list[int] = []
        decode: list[ScheduledSeq] = []
        prefills: list[PrefillSeq] = []
        for s in seqs:
            req = s.request
            toks = req.all_token_ids[s.start : s.context_len]
            p = range(s.start, s.context_len)
            ids.extend(toks)
            pos.extend(p)
            w_blocks.extend(req.block_ids[j // bs] for j in p)
            w_off.extend(j % bs for j in p)
            if s.num_new_tokens == 1:
                decode.append(s)
            else:
                blocks = torch.tensor(req.block_ids[: -(-s.context_len // bs)])
                prefills.append(
                    PrefillSeq(
                        token_start=len(ids) - s.num_new_tokens,
                        q_len=s.num_new_tokens,
                        ctx_len=s.context_len,
                        pages=(blocks // bpp).to(self.device),
                        slots=(blocks % bpp).to(self.device),
                    )
                )
        dev = self.device
        wb = torch.tensor(w_blocks)
        meta = AttentionMetadata(
            write_pages=(wb // bpp).to(dev),
            write_slots=(wb % bpp).to(dev),
            write_offsets=torch.tensor(w_off).to(dev),
            num_decode=len(decode),
            decode_groups=[],
            prefills=prefills,
        )
        num_blocks = [-(-s.context_len // bs) for s in decode]
        for a, b in group_decodes(num_blocks):
            nb = num_blocks[b - 1]
            table = torch.zeros(b - a, nb, dtype=torch.long)
            for r, s in enumerate(decode[a:b]):
                # Padding repeats the sequence's first block: KV bytes, finite, masked out.
                ids_r = s.request.block_ids[: num_blocks[a + r]]
                table[r] = torch.tensor(ids_r + [ids_r[0]] * (nb - len(ids_r)))
            lens = torch.tensor([s.context_len for s in decode[a:b]])
            mask = None
            if int(lens.min()) != nb * bs:
                mask = (torch.arange(nb * bs)[None, :] < lens[:, None])[:, None, None, :].to(dev)
            meta.decode_groups.append(
                DecodeGroup(a, (table // bpp).to(dev), (table % bpp).to(dev), mask, lens.to(dev))
            )
        return torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta


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

    def release(self, request_id: str) -> None:
        for r in self.runners.values():
            r.sampler.release(request_id)
