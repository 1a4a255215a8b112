"""Helpers shared by the GPU benchmarks: CLI arguments, device facts, peak bandwidth, timing, JSON
output, and driving an engine to a batch of pure decode steps.

Every script runs on CUDA for real and on a CPU in `--tiny` mode (small shapes, a tiny random model)
so that the test suite keeps them working. Timings: CUDA events after warm-up on a GPU, the wall
clock on a CPU; the median of several repeats is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1 << 20
GiB = 1 << 30

# Datasheet HBM bandwidth of GPUs that have no profile of their own in oneiros.sim.hardware.
# NVIDIA H200 datasheet: 141 GB HBM3e at 4.8 TB/s (the gh200 profile is the 96 GB HBM3 part, 4.0).
DATASHEET_BW = {"h200": (4.8e12, "NVIDIA H200 datasheet: 4.8 TB/s HBM3e")}


# ---- arguments ----------------------------------------------------------------------------------
def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The arguments every GPU benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument("--out", default=f"results/gpu/{name}.json", help="JSON output path")
    p.add_argument(
        "--tiny", action="store_true",
        help="small shapes and random:llama-tiny: a smoke run that finishes on a CPU in seconds",
    )
    p.add_argument(
        "--hardware", default=None,
        help="oneiros.sim.hardware profile for the peak figures (default: guessed from the "
        "device name: H100 -> h100-sxm, H200 -> gh200 with the H200 datasheet bandwidth, cpu)",
    )
    p.add_argument("--peak-bw", type=float, default=None, help="peak memory bytes/s (overrides)")
    p.add_argument("--seed", type=int, default=0)
    return p


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine options of the benchmarks that drive an engine (see `engine_kwargs`)."""
    p.add_argument("--model", default=None, help="default random:llama-3-8b (tiny: llama-tiny)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--memory-budget", default=None,
                   help="EngineConfig.memory_budget (default: the engine's; tiny: 64MiB)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)


def engine_kwargs(args: argparse.Namespace, device: torch.device, **overrides: Any) -> dict:
    """EngineConfig fields of a benchmark's engine: `args.model` as tenant "m" on `device`, the
    dtype, seed, memory budget (tiny: 64MiB) and batched-token budget of `add_engine_args`; then
    `overrides`, those that are not None."""
    kw: dict[str, Any] = {"models": {"m": args.model}, "device": str(device),
                          "dtype": args.dtype, "seed": args.seed}
    budget = args.memory_budget or ("64MiB" if args.tiny else None)
    if budget is not None:
        kw["memory_budget"] = budget
    if args.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return kw


def build_engine(args: argparse.Namespace, device: torch.device, **overrides: Any) -> Any:
    """An LLMEngine with `engine_kwargs(args, device, **overrides)`."""
    from oneiros.config import EngineConfig
    from oneiros.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(**engine_kwargs(args, device, **overrides)))


def int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# ---- device facts -------------------------------------------------------------------------------
def device_of(args: argparse.Namespace) -> torch.device:
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but CUDA is not available (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return dev


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Library versions, read from package metadata (importing Triton here would fix its
    interpreter mode before a script had the chance to set TRITON_INTERPRET)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton") or _version("pytorch-triton"),
        "transformers": _version("transformers"),
    }


def git_state() -> dict[str, Any]:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "oneiros"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return {"commit": rev or None, "oneiros_dirty": bool(dirty) if rev else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "oneiros_dirty": None}


def guess_hardware(name: str) -> str:
    """A profile name of oneiros.sim.hardware for a device name."""
    from oneiros.sim.hardware import PROFILES

    n = name.upper()
    if name == "cpu":
        return "cpu"
    if "GH200" in n:
        return "gh200"
    if "H200" in n:
        for cand in ("h200", "gh200", "h100-sxm"):
            if cand in PROFILES:
                return cand
    if "H100" in n:
        return "h100-pcie" if "PCIE" in n and "h100-pcie" in PROFILES else "h100-sxm"
    if "A100" in n and "a100-80g" in PROFILES:
        return "a100-80g"
    print(f"warning: no hardware profile for {name!r}: using h100-sxm (use --hardware or "
          "--peak-bw)", file=sys.stderr)
    return "h100-sxm"


def resolve_peak(name: str, hardware: str | None, peak_bw: float | None) -> dict[str, Any]:
    """Peak memory bandwidth and the profile it comes from. An H200 (not a GH200) without a profile
    of its own gets the gh200 profile with its datasheet bandwidth, 4.8 TB/s, in place of the
    profile's 4.0 TB/s (which would overstate every fraction of peak by 20%)."""
    from oneiros.sim.hardware import load_profile

    guessed = hardware is None
    prof = load_profile(hardware or guess_hardware(name))
    bw, source = prof.mem_bw, f"oneiros.sim.hardware profile {prof.name!r}"
    n = name.upper()
    if guessed and "H200" in n and "GH200" not in n and prof.name != "h200":
        bw, source = DATASHEET_BW["h200"]
    if peak_bw is not None:
        if peak_bw <= 0:
            raise SystemExit("--peak-bw must be positive")
        bw, source = peak_bw, "--peak-bw"
    return {
        "hardware": prof.name,
        "peak_bw": float(bw),
        "peak_bw_source": source,
        "profile_mem_bw": prof.mem_bw,
        "profile_mem_eff": prof.mem_eff,
        "profile_h2d_bw": prof.h2d_bw,
        "profile_d2h_bw": prof.d2h_bw,
    }


def header(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The part of every JSON report that says what ran where."""
    dev_name = device_name(device)
    return {
        "benchmark": name,
        "args": dict(vars(args)),
        "argv": sys.argv[1:],
        "device": {"type": device.type, "torch_device": str(device), "name": dev_name},
        "device_name": dev_name,
        "versions": versions(),
        "git": git_state(),
        "peak": resolve_peak(dev_name, args.hardware, args.peak_bw),
        "env": {
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "hostname": platform.node(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    print(f"written to {path}", file=sys.stderr)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.device, torch.dtype, Path)):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


# ---- timing -------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


class L2Flush:
    """Writes a buffer larger than the GPU's L2 cache between timed calls, so that a kernel reads
    its inputs from HBM, not from what the previous repeat left in L2 (50 MiB on an H100)."""

    def __init__(self, device: torch.device, nbytes: int = 256 * MiB) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    before: Callable[[], Any] | None = None,
) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls. On CUDA each call is
    bracketed by events on the current stream (`before`, e.g. an L2 flush, runs outside them; it
    also lets the host queue the timed call before the GPU reaches it, so launch latency does not
    count); on a CPU by the wall clock."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    sync(device)
    out: list[float] = []
    if device.type == "cuda":
        pairs = []
        for _ in range(repeats):
            if before is not None:
                before()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            pairs.append((t0, t1))
        torch.cuda.synchronize(device)
        out = [a.elapsed_time(b) / 1e3 for a, b in pairs]
    else:
        for _ in range(repeats):
            if before is not None:
                before()
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


class StepTimer:
    """Times one call at a time (an engine step, which ends with a host sync): CUDA events on the
    current stream, or the wall clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.device.type == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            res = fn()
            t1.record()
            t1.synchronize()
            return t0.elapsed_time(t1) / 1e3, res
        t = time.perf_counter()
        res = fn()
        return time.perf_counter() - t, res


# ---- output -------------------------------------------------------------------------------------
def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, heading, format spec such as '.3f'); missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, spec in columns:
            v = r.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                line.append("-")
            else:
                line.append(format(v, spec) if spec else str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for k, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def gbps(x: float | None) -> float | None:
    return None if x is None else x / 1e9


# ---- engines ------------------------------------------------------------------------------------
def tiny_model(args: argparse.Namespace, default: str) -> str:
    if getattr(args, "model", None):
        return args.model
    return "random:llama-tiny" if args.tiny else default


def cache_random_weights(dtype: torch.dtype) -> dict[str, Any]:
    """Make every engine built in this process draw a `random:` model's weights once.

    Drawing random Llama-3-8B weights takes about a minute on the CPU; a benchmark that builds
    several engines (graphs on/off, two attention backends) would pay it each time. The engine
    resolves its sources with `oneiros.engine.engine.resolve`; this wraps it so that a random
    source's tensors are kept, already cast to the model dtype (the cast the engine makes when it
    packs them, so the weights are bit for bit the same). Returns the cache: source -> ModelSource.
    """
    import oneiros.engine.engine as engine_mod

    cache: dict[str, Any] = {}
    orig = getattr(engine_mod, "resolve", None)
    if orig is None or getattr(orig, "_gpu_bench_cache", None) is not None:
        return getattr(orig, "_gpu_bench_cache", cache)

    def resolve(source: str):
        if source in cache:
            return cache[source]
        src = orig(source)
        if source.startswith("random:"):
            draw, kept = src.tensor, {}

            def tensor(n: str) -> torch.Tensor:
                t = kept.get(n)
                if t is None:
                    t = kept[n] = draw(n).to(dtype)
                return t

            src = dataclasses.replace(src, tensor=tensor)
        cache[source] = src
        return src

    resolve._gpu_bench_cache = cache  # type: ignore[attr-defined]
    engine_mod.resolve = resolve
    return cache


def engine_dtype(device: torch.device, dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def free_engine(device: torch.device) -> None:
    """After the last reference to an engine is dropped: give its arena back to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated(device)
        if left > GiB:
            print(f"warning: {left / GiB:.1f} GiB still allocated on {device} after freeing",
                  file=sys.stderr, flush=True)


def random_prompt(gen: torch.Generator, length: int, vocab: int, avoid: set[int]) -> list[int]:
    """Random token ids, none of them in `avoid` (EOS, BOS)."""
    allowed = _allowed_ids(vocab, frozenset(avoid))
    ids = torch.randint(0, len(allowed), (length,), generator=gen).tolist()
    return [allowed[t] for t in ids]


@functools.lru_cache(maxsize=8)
def _allowed_ids(vocab: int, avoid: frozenset[int]) -> tuple[int, ...]:
    return tuple(t for t in range(vocab) if t not in avoid)


def start_decoding(
    engine: Any, model: str, batch: int, context: int, max_tokens: int, seed: int,
    max_steps: int = 100_000,
) -> list[Any]:
    """Add `batch` requests of `context` random prompt tokens (greedy, EOS ignored) and step the
    engine until every one has its first token: from then on each step is a pure decode step of the
    whole batch. Returns the requests."""
    from oneiros.core import SamplingParams

    t = engine.tenants[model]
    cfg = t.model.cfg
    avoid = set(cfg.eos_token_ids) | ({cfg.bos_token_id} - {None})
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    reqs = [
        engine.add_request(random_prompt(gen, context, cfg.vocab_size, avoid), params, model)
        for _ in range(batch)
    ]
    for _ in range(max_steps):
        if all(r.output_token_ids for r in reqs):
            break
        engine.step()
    else:
        raise RuntimeError(f"prefill of {batch} x {context} tokens did not finish")
    if any(r.finished for r in reqs):
        raise RuntimeError("a request finished during prefill: raise max_tokens")
    return reqs


def decode_steps(
    engine: Any, reqs: list[Any], steps: int, timer: StepTimer, kv_bytes_per_token: int,
) -> dict[str, Any]:
    """Time `steps` engine steps of the decoding batch `reqs`. Checks that each step was a pure
    decode step of the whole batch (every request got exactly one token, none was preempted)."""
    times: list[float] = []
    kv_bytes: list[int] = []
    pure = True
    for _ in range(steps):
        before = [len(r.output_token_ids) for r in reqs]
        preempt = sum(r.num_preemptions for r in reqs)
        # The step's new token of each request attends to all its tokens (its own K/V included).
        kv_bytes.append(sum(r.num_tokens for r in reqs) * kv_bytes_per_token)
        dt, _ = timer(engine.step)
        times.append(dt)
        after = [len(r.output_token_ids) for r in reqs]
        if any(a != b + 1 for a, b in zip(after, before, strict=True)):
            pure = False
        if sum(r.num_preemptions for r in reqs) != preempt:
            pure = False
    return {
        "step_times_s": times,
        "step_s": median(times),
        "kv_bytes_per_step": float(sum(kv_bytes) / max(1, len(kv_bytes))),
        "pure_decode": pure,
    }


def release(engine: Any, reqs: list[Any]) -> None:
    for r in reqs:
        engine.abort(r.request_id)


def weight_bytes(model: Any, batch: int) -> dict[str, int]:
    """Parameter bytes of a DecoderModel: all of them, and those one decode step of `batch`
    sequences reads (every layer, the final norm, the LM head; only `batch` rows of the embedding
    table)."""
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    cfg = model.cfg
    layer = sum(math.prod(s) for s in model.layer_shapes().values()) * itemsize
    resident = {k: math.prod(s) * itemsize for k, s in model.resident_shapes().items()}
    total = layer * cfg.num_layers + sum(resident.values())
    embed = resident.get("embed", 0)
    head = resident.get("lm_head", embed)  # tied: the LM head reads the embedding table
    others = sum(v for k, v in resident.items() if k not in ("embed", "lm_head"))
    per_step = layer * cfg.num_layers + head + others
    if "lm_head" in resident:  # untied: the embedding lookups read `batch` rows of their own
        per_step += min(batch, cfg.vocab_size) * cfg.hidden_size * itemsize
    return {"param_bytes": total, "layer_bytes": layer, "read_per_step": per_step}
