"""Offline throughput: the same mixed-length workload through oneiros and through transformers.

Workload: `--num-prompts` prompts of random token ids (special tokens excluded, fixed seed), prompt
lengths uniform in [--min-prompt, --max-prompt], output lengths uniform in
[--min-output, --max-output], every output forced to its exact length (greedy, EOS ignored).

  oneiros       one `LLM` engine, all requests submitted at once (continuous batching), each with
                SamplingParams(temperature=0, max_tokens=L, ignore_eos=True).
  transformers  `model.generate` the way a user batches it: chunks of --hf-batch-size prompts in
                workload order, left padding, greedy, EOS disabled, max_new_tokens = the longest
                output in the chunk. Only each request's own L tokens count as useful output; the
                rest (shorter requests running on to the chunk's maximum) is reported as overhead.

Throughput is generated (useful) tokens per wall-clock second. Example:

    .venv/bin/python benchmarks/throughput.py                       # 64 prompts, both systems
    .venv/bin/python benchmarks/throughput.py --num-prompts 16 --skip-hf

The JSON (--out) holds the configuration, per-system numbers and `ratio` (oneiros / transformers).
The host's load average is recorded around each phase: on a shared machine, compare runs with care.
By default OMP_WAIT_POLICY=PASSIVE is set before torch loads (see --omp-wait-policy): with the
spinning default, an oversubscribed CPU makes both systems 10-20x slower and the numbers
meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _early_omp_policy(argv: list[str]) -> str | None:
    """Apply --omp-wait-policy before torch (and its OpenMP runtime) is loaded.

    On a shared, oversubscribed CPU the default (spinning) OpenMP wait policy makes every parallel
    op wait for descheduled threads: decode steps ran 10-20x slower here with 2 threads. PASSIVE
    (threads sleep at barriers) avoids that; the default respects an OMP_WAIT_POLICY already set."""
    policy = "auto"
    for i, a in enumerate(argv):
        if a == "--omp-wait-policy" and i + 1 < len(argv):
            policy = argv[i + 1]
        elif a.startswith("--omp-wait-policy="):
            policy = a.split("=", 1)[1]
    if policy == "auto":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    elif policy in ("active", "passive"):
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return os.environ.get("OMP_WAIT_POLICY")


if __name__ == "__main__":
    _early_omp_policy(sys.argv[1:])

import numpy as np  # noqa: E402
import torch  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm ships with transformers
    tqdm = None

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oneiros.bench.metrics import distribution  # noqa: E402
from oneiros.core import SamplingParams  # noqa: E402
from oneiros.engine.llm import LLM  # noqa: E402
from oneiros.models.loader import resolve  # noqa: E402

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- workload -----------------------------------------------------------------------------------
def special_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids or [])
    ids |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids


def make_workload(args: argparse.Namespace, vocab_size: int, excluded: set[int]) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    allowed = np.array(sorted(set(range(vocab_size)) - excluded), dtype=np.int64)
    work = []
    for _ in range(args.num_prompts):
        plen = int(rng.integers(args.min_prompt, args.max_prompt + 1))
        olen = int(rng.integers(args.min_output, args.max_output + 1))
        ids = rng.choice(allowed, size=plen).tolist()
        work.append({"prompt": [int(t) for t in ids], "output_len": olen})
    return work


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_state() -> dict[str, Any]:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "oneiros"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return {"commit": rev or None, "oneiros_dirty": bool(dirty)}
    except OSError:
        return {"commit": None, "oneiros_dirty": None}


def progress(total: int, desc: str):
    if tqdm is not None:
        return tqdm(total=total, desc=desc, unit="tok", mininterval=2.0, file=sys.stderr)

    class _Plain:  # minimal stand-in
        def __init__(self) -> None:
            self.n, self.last = 0, time.perf_counter()

        def update(self, k: int) -> None:
            self.n += k
            if time.perf_counter() - self.last > 5:
                print(f"{desc}: {self.n}/{total} tokens", file=sys.stderr, flush=True)
                self.last = time.perf_counter()

        def close(self) -> None:
            print(f"{desc}: {self.n}/{total} tokens", file=sys.stderr, flush=True)

    return _Plain()


# ---- oneiros ------------------------------------------------------------------------------------
def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if args.memory_budget is not None:
        kw["memory_budget"] = args.memory_budget
    if args.max_num_seqs is not None:
        kw["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    return kw


def run_oneiros_requests(
    llm: LLM, work: list[dict], desc: str | None, on_step: Any = None
) -> tuple[list, int]:
    """Submit every request, then step the engine until all finish (what LLM.generate does), with
    a progress bar over generated tokens. Returns outputs in workload order and the step count."""
    engine = llm.engine
    reqs = [
        engine.add_request(
            w["prompt"],
            SamplingParams(temperature=0.0, max_tokens=w["output_len"], ignore_eos=True),
        )
        for w in work
    ]
    ids = [r.request_id for r in reqs]
    bar = progress(sum(w["output_len"] for w in work), desc) if desc else None
    done: dict[str, Any] = {}
    steps = 0
    while len(done) < len(ids):
        outs = engine.step()
        steps += 1
        if on_step is not None:
            on_step()
        if bar is not None:
            bar.update(len(outs))
        for out in outs:
            if out.finished:
                done[out.request_id] = out
    if bar is not None:
        bar.close()
    return [done[i] for i in ids], steps


class PhaseTimer:
    """Wall time per engine phase, by wrapping oneiros functions for the duration of one run.

    Inclusive times (a phase contains the phases it calls). CPU only: on CUDA, kernels are async
    and the times would land wherever the host next synchronises. Targets are named by the objects
    themselves, not by strings: a renamed function fails here, at import, instead of vanishing
    from the report.
    """

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, fn: Any, label: str) -> None:
        attr = fn.__name__
        orig = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        if orig is not fn:
            raise RuntimeError(f"{label}: {owner!r} has no {attr} of its own")
        st = self.stats.setdefault(label, [0, 0.0])
        clock = time.perf_counter

        def timed(*a: Any, **k: Any) -> Any:
            t = clock()
            try:
                return orig(*a, **k)
            finally:
                st[0] += 1
                st[1] += clock() - t

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, orig))

    def install(self) -> None:
        from oneiros.attention import torch_ref
        from oneiros.engine import commit
        from oneiros.engine.commit import Committer
        from oneiros.engine.engine import LLMEngine
        from oneiros.engine.executor import ModelRunner, TorchExecutor
        from oneiros.engine.planner import Planner
        from oneiros.engine.sampler import Sampler
        from oneiros.engine.scheduler import Scheduler
        from oneiros.engine.tokenizer import IncrementalText, Tokenizer
        from oneiros.models import llama
        from oneiros.models.base import DecoderModel

        targets = [
            (LLMEngine, LLMEngine.step, "engine.step (total)"),
            (Planner, Planner.plan, "planner.plan (tenancy, schedulers, memory)"),
            (Scheduler, Scheduler.schedule, "scheduler.schedule"),
            (TorchExecutor, TorchExecutor.execute, "executor.execute"),
            (ModelRunner, ModelRunner._prepare, "runner._prepare"),
            (ModelRunner, ModelRunner.forward, "runner.forward (prepare+model+lm_head)"),
            (DecoderModel, DecoderModel.forward, "model.forward (all layers)"),
            (DecoderModel, DecoderModel.lm_head, "model.lm_head"),
            (torch.nn.functional, torch.nn.functional.linear, "F.linear (all matmuls)"),
            (llama, llama.rms_norm, "rms_norm"),
            (torch_ref, torch_ref.write_kv, "attention: write_kv"),
            (torch_ref, torch_ref.attend, "attention: attend (incl. gather)"),
            (torch_ref, torch_ref._gather, "attention: _gather (KV copy)"),
            (Sampler, Sampler.sample, "sampler.sample"),
            (Committer, Committer.commit, "committer.commit"),
            (commit, commit.output, "commit.output (RequestOutput)"),
            (IncrementalText, IncrementalText.update, "detok: IncrementalText.update"),
            (Tokenizer, Tokenizer.decode, "detok: Tokenizer.decode"),
            (Committer, Committer.finish, "committer.finish"),
        ]
        for owner, fn, label in targets:
            self.wrap(owner, fn, label)

    def uninstall(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()

    def report(self, wall: float) -> dict[str, dict[str, float]]:
        return {
            k: {"calls": int(n), "s": round(t, 3), "pct_of_wall": round(100 * t / wall, 1)}
            for k, (n, t) in self.stats.items()
        }


def bench_oneiros(args: argparse.Namespace, work: list[dict]) -> dict[str, Any]:
    t0 = time.perf_counter()
    llm = LLM(args.model, **engine_kwargs(args))
    load_s = time.perf_counter() - t0
    print(f"[oneiros] loaded in {load_s:.1f}s; warming up", file=sys.stderr, flush=True)
    warm = [
        {"prompt": w["prompt"][:32], "output_len": 8} for w in work[: max(1, min(4, len(work)))]
    ]
    run_oneiros_requests(llm, warm, None)
    sync(args.device)

    prof = None
    if args.profile == "cprofile":
        import cProfile

        prof = cProfile.Profile()
    elif args.profile == "torch":
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        # Every step is its own trace, folded into running totals and dropped: one profile over
        # the whole run keeps every event and ran out of memory (20 GB for 16 prompts).
        prof = OpProfile()
        prof.torch = profile(
            activities=acts,
            record_shapes=True,
            schedule=lambda step: torch.profiler.ProfilerAction.RECORD_AND_SAVE,
            on_trace_ready=prof.fold,
        )

    phases = PhaseTimer() if args.profile in ("phases", "torch") and args.device == "cpu" else None
    if phases is not None:
        phases.install()
    load_before = loadavg()
    c0, t0 = time.process_time(), time.perf_counter()
    if args.profile == "cprofile":
        prof.enable()
    elif args.profile == "torch":
        prof.torch.__enter__()
    on_step = prof.torch.step if args.profile == "torch" else None
    outs, steps = run_oneiros_requests(llm, work, "oneiros", on_step)
    sync(args.device)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if args.profile == "cprofile":
        prof.disable()
    elif args.profile == "torch":
        prof.torch.__exit__(None, None, None)
    if phases is not None:
        phases.uninstall()

    gen = [len(o.token_ids) for o in outs]
    want = [w["output_len"] for w in work]
    if gen != want:
        bad = sum(g != w for g, w in zip(gen, want, strict=True))
        print(
            f"[oneiros] WARNING: {bad} requests did not produce their forced length",
            file=sys.stderr,
        )
    prompt_tokens = sum(len(w["prompt"]) for w in work)
    ttft = [o.ttft for o in outs if o.ttft is not None]
    tbt = [g for o in outs for g in o.tbt]
    engine = llm.engine
    preempt = sum(getattr(t.scheduler, "num_preemptions", 0) for t in engine.tenants.values())
    cfg = engine.config
    res = {
        "load_s": load_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "steps": steps,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": sum(gen),
        "tokens_per_s": sum(gen) / wall,
        "total_tokens_per_s": (sum(gen) + prompt_tokens) / wall,
        "all_lengths_exact": gen == want,
        "ttft_s": distribution(ttft),
        "tbt_s": distribution(tbt),
        "num_preemptions": preempt,
        "arena_pages": getattr(getattr(engine, "arena", None), "num_pages", None),
        "page_bytes": getattr(cfg, "page_bytes", None),
        "block_size": getattr(cfg, "block_size", None),
        "max_num_seqs": getattr(cfg, "max_num_seqs", None),
        "max_num_batched_tokens": getattr(cfg, "max_num_batched_tokens", None),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "profiled": args.profile,
    }
    if phases is not None:
        res["phases"] = phases.report(wall)
    if prof is not None:
        write_profile(args, prof)
        if args.profile == "torch":
            res["op_categories_s"] = {k: round(v, 3) for k, v in prof.categories().items()}
    res["_token_ids"] = [o.token_ids for o in outs]
    del llm
    return res


class OpProfile:
    """Running totals of torch profiler events (self CPU time) over per-step traces."""

    CATEGORIES = (  # first match wins
        ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
        ("sdpa", ("scaled_dot_product", "aten::_softmax", "aten::softmax")),
        ("kv gather/scatter", ("aten::index", "aten::_index_put_impl_", "aten::index_put_")),
        ("copies (copy_/clone/cat)", ("aten::copy_", "aten::clone", "aten::cat", "aten::_to_copy")),
    )

    def __init__(self) -> None:
        self.torch: Any = None
        self.by_name: dict[str, list[float]] = {}
        self.by_shape: dict[tuple[str, str], list[float]] = {}

    def fold(self, p: Any) -> None:
        for e in p.key_averages():
            a = self.by_name.setdefault(e.key, [0, 0.0])
            a[0] += e.count
            a[1] += e.self_cpu_time_total
        for e in p.key_averages(group_by_input_shape=True):
            a = self.by_shape.setdefault((e.key, str(e.input_shapes)), [0, 0.0])
            a[0] += e.count
            a[1] += e.self_cpu_time_total

    def categories(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, (_, us) in self.by_name.items():
            cat = next(
                (c for c, keys in self.CATEGORIES if any(k in name for k in keys)), "other ops"
            )
            if name.startswith("ProfilerStep"):
                cat = "python / not in torch ops (ProfilerStep self time)"
            out[cat] = out.get(cat, 0.0) + us / 1e6
        return out

    def table(self, n: int = 40) -> str:
        total = sum(us for _, us in self.by_name.values())
        lines = [f"total self CPU time in profiled steps: {total / 1e6:.2f} s", "", "by category:"]
        for c, sec in sorted(self.categories().items(), key=lambda x: -x[1]):
            lines.append(f"  {c:52s} {sec:9.2f} s  {100 * sec * 1e6 / total:5.1f}%")
        lines += ["", f"{'op':55s} {'calls':>8s} {'self s':>9s} {'%':>6s}"]
        for k, (n_, us) in sorted(self.by_name.items(), key=lambda x: -x[1][1])[:n]:
            lines.append(f"{k[:55]:55s} {int(n_):8d} {us / 1e6:9.3f} {100 * us / total:6.1f}")
        lines += ["", "by input shape:", f"{'op':40s} {'calls':>8s} {'self s':>9s}  shapes"]
        for (k, sh), (n_, us) in sorted(self.by_shape.items(), key=lambda x: -x[1][1])[:n]:
            lines.append(f"{k[:40]:40s} {int(n_):8d} {us / 1e6:9.3f}  {sh[:110]}")
        return "\n".join(lines) + "\n"


def write_profile(args: argparse.Namespace, prof: Any) -> None:
    out = Path(args.out)
    if args.profile == "cprofile":
        import io
        import pstats

        path = out.with_suffix(".oneiros.prof")
        prof.dump_stats(str(path))
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
        s.write("\n")
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(40)
        out.with_suffix(".oneiros.cprofile.txt").write_text(s.getvalue())
        print(f"[oneiros] cProfile written to {path}", file=sys.stderr)
    else:
        path = out.with_suffix(".oneiros.torchprof.txt")
        path.write_text(prof.table())
        print(f"[oneiros] torch profile written to {path}", file=sys.stderr)


# ---- transformers -------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return _TORCH_DTYPES[args.dtype]


def bench_hf(args: argparse.Namespace, work: list[dict]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = resolve(args.model)
    if src.hf_dir is None:
        raise SystemExit(f"model {args.model!r} has no Hugging Face directory for transformers")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(src.hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(src.hf_dir), dtype=hf_dtype(args))
    model.to(args.device).eval()
    load_s = time.perf_counter() - t0
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    # Greedy, no EOS stopping (the counterpart of ignore_eos: logits untouched, generation runs on).
    # generate() fills unset (None) fields from model.generation_config, so clear EOS there too.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad

    def generate(batch: list[dict], max_new: int) -> torch.Tensor:
        n = max(len(w["prompt"]) for w in batch)
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for r, w in enumerate(batch):  # left padding
            p = w["prompt"]
            ids[r, n - len(p) :] = torch.tensor(p)
            mask[r, n - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(args.device),
                attention_mask=mask.to(args.device),
                generation_config=GenerationConfig(
                    do_sample=False, max_new_tokens=max_new, pad_token_id=pad, eos_token_id=None
                ),
            )
        sync(args.device)
        return out[:, n:].cpu()

    print(f"[transformers] loaded in {load_s:.1f}s; warming up", file=sys.stderr, flush=True)
    generate([{"prompt": w["prompt"][:32]} for w in work[: max(1, min(4, len(work)))]], 8)

    bs = args.hf_batch_size if args.hf_batch_size > 0 else len(work)
    order = list(range(len(work)))
    if args.hf_sort:
        order.sort(key=lambda i: len(work[i]["prompt"]) + work[i]["output_len"])
    chunks = [order[i : i + bs] for i in range(0, len(order), bs)]
    useful = sum(w["output_len"] for w in work)
    bar = progress(useful, "transformers")
    token_ids: list[list[int] | None] = [None] * len(work)
    batches = []
    padded_gen = prompt_pad = 0
    load_before = loadavg()
    c0, t0 = time.process_time(), time.perf_counter()
    for chunk in chunks:
        batch = [work[i] for i in chunk]
        max_new = max(w["output_len"] for w in batch)
        tb = time.perf_counter()
        gen = generate(batch, max_new)
        dt = time.perf_counter() - tb
        if gen.shape[1] != max_new:
            print(f"[transformers] WARNING: generated {gen.shape[1]} != {max_new}", file=sys.stderr)
        for r, i in enumerate(chunk):
            token_ids[i] = gen[r, : work[i]["output_len"]].tolist()
        n_prompt = max(len(w["prompt"]) for w in batch)
        padded_gen += len(batch) * gen.shape[1]
        prompt_pad += sum(n_prompt - len(w["prompt"]) for w in batch)
        b_useful = sum(w["output_len"] for w in batch)
        batches.append(
            {
                "size": len(batch),
                "max_new_tokens": max_new,
                "useful_tokens": b_useful,
                "wall_s": dt,
                "useful_tokens_per_s": b_useful / dt,
            }
        )
        bar.update(b_useful)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    bar.close()
    prompt_tokens = sum(len(w["prompt"]) for w in work)
    return {
        "load_s": load_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "batch_size": bs,
        "num_batches": len(chunks),
        "sorted_by_length": args.hf_sort,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": useful,  # useful: each request's own L tokens
        "generated_tokens_incl_padding": padded_gen,
        "padded_token_overhead": (padded_gen - useful) / useful,
        "prompt_pad_tokens": prompt_pad,
        "tokens_per_s": useful / wall,
        "padded_tokens_per_s": padded_gen / wall,
        "total_tokens_per_s": (useful + prompt_tokens) / wall,
        "batches": batches,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "_token_ids": token_ids,
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How far greedy outputs agree (a sanity check: both should run the same model)."""
    prefix, exact = [], 0
    for x, y in zip(a, b, strict=True):
        n = 0
        for u, v in zip(x, y, strict=False):
            if u != v:
                break
            n += 1
        prefix.append(n / max(1, min(len(x), len(y))))
        exact += x == y
    first = sum(bool(x) and bool(y) and x[0] == y[0] for x, y in zip(a, b, strict=True))
    return {
        "first_token_match": first / max(1, len(a)),
        "identical_outputs": exact / max(1, len(a)),
        "mean_common_prefix_fraction": float(np.mean(prefix)) if prefix else None,
    }


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="smollm2", help="oneiros model source (needs an HF dir for HF)"
    )
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/throughput.json")
    p.add_argument("--skip-hf", action="store_true", help="run oneiros only")
    p.add_argument("--skip-oneiros", action="store_true", help="run transformers only")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--hf-batch-size", type=int, default=16, help="transformers batch (0: all)")
    p.add_argument(
        "--hf-sort",
        action="store_true",
        help="sort requests by length before batching for transformers (less padding)",
    )
    p.add_argument("--memory-budget", default=None, help="oneiros EngineConfig.memory_budget")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)"
    )
    p.add_argument(
        "--omp-wait-policy",
        choices=["auto", "active", "passive", "env"],
        default="auto",
        help="OpenMP wait policy, set before torch loads (auto: OMP_WAIT_POLICY if set, "
        "else PASSIVE; env: leave the environment alone)",
    )
    p.add_argument(
        "--profile",
        choices=["phases", "cprofile", "torch"],
        default=None,
        help="profile the timed oneiros run: phases = wall time per engine phase into "
        "the JSON (light); torch = phases + op table; cprofile = Python profile "
        "(heavy). Profiled runs are slower: do not quote their tokens/s",
    )
    a = p.parse_args(argv)
    if not (0 < a.min_prompt <= a.max_prompt and 0 < a.min_output <= a.max_output):
        p.error("need 0 < min <= max for prompt and output lengths")
    if a.num_prompts <= 0:
        p.error("--num-prompts must be positive")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    src = resolve(args.model)
    excluded: set[int] = set(src.config.eos_token_ids)
    if src.config.bos_token_id is not None:
        excluded.add(src.config.bos_token_id)
    if src.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        excluded |= special_ids(AutoTokenizer.from_pretrained(str(src.tokenizer_dir)))
    work = make_workload(args, src.config.vocab_size, excluded)

    result: dict[str, Any] = {
        "benchmark": "throughput",
        "model": args.model,
        "args": vars(args),
        "workload": {
            "num_prompts": len(work),
            "prompt_tokens": sum(len(w["prompt"]) for w in work),
            "output_tokens": sum(w["output_len"] for w in work),
            "prompt_len_mean": float(np.mean([len(w["prompt"]) for w in work])),
            "output_len_mean": float(np.mean([w["output_len"] for w in work])),
            "prompt_source": "random token ids (special tokens excluded)",
        },
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "device_name": torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor(),
            **git_state(),
        },
    }
    print(
        f"workload: {len(work)} prompts, {result['workload']['prompt_tokens']} prompt tokens, "
        f"{result['workload']['output_tokens']} output tokens; threads={torch.get_num_threads()}",
        file=sys.stderr,
        flush=True,
    )

    one = hf = None
    if not args.skip_oneiros:
        one = bench_oneiros(args, work)
        result["oneiros"] = {k: v for k, v in one.items() if not k.startswith("_")}
        print(
            f"[oneiros] {one['generated_tokens']} tokens in {one['wall_s']:.1f}s = "
            f"{one['tokens_per_s']:.1f} tok/s",
            file=sys.stderr,
            flush=True,
        )
    if not args.skip_hf:
        hf = bench_hf(args, work)
        result["transformers"] = {k: v for k, v in hf.items() if not k.startswith("_")}
        print(
            f"[transformers] {hf['generated_tokens']} useful tokens in {hf['wall_s']:.1f}s = "
            f"{hf['tokens_per_s']:.1f} tok/s ({hf['padded_token_overhead']:.0%} padded overhead)",
            file=sys.stderr,
            flush=True,
        )
    if one is not None and hf is not None:
        result["ratio"] = one["tokens_per_s"] / hf["tokens_per_s"]
        result["ratio_vs_padded_tokens_per_s"] = one["tokens_per_s"] / hf["padded_tokens_per_s"]
        result["ratio_cpu_time"] = hf["cpu_s"] / one["cpu_s"]
        result["greedy_agreement"] = agreement(one["_token_ids"], hf["_token_ids"])
        print(f"ratio oneiros/transformers = {result['ratio']:.3f}", file=sys.stderr)

    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in result if k not in ("args", "env")}, indent=2))
    print(f"written to {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
