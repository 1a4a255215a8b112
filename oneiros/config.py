"""One frozen configuration for the engine; the CLI is built from it. Nothing is read at import."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from oneiros.core import ConfigError
from oneiros.engine.policies import POLICIES

MiB = 1 << 20
GiB = 1 << 30

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": MiB, "mb": 10**6,
          "mib": MiB, "g": GiB, "gb": 10**9, "gib": GiB}


# Tokens of growth admissions leave room for under policy oneiros (growth_reserve_tokens).
GROWTH_RESERVE_TOKENS = 32


def parse_bytes(value: str | float) -> int | float:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, '0.5' -> 0.5 (a fraction), 1024 -> 1024."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"cannot read {value!r} as a size (examples: 2GiB, 512MiB, 0.8)")
    digits, unit = m.group(1), m.group(2)
    if "." not in digits:  # exact: float would round sizes above 2**53
        return int(digits) * _UNITS[unit]
    num = float(digits)
    if unit == "" and num <= 1.0:
        return num
    return int(num * _UNITS[unit])


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs. `models` maps a tenant name to a model source."""

    models: dict[str, str] = field(default_factory=lambda: {"smollm2": "smollm2"})
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    # Bytes (int or '4GiB'), or a fraction (0, 1] of the device's free memory. None: on CPU the
    # weights plus 1 GiB of KV cache, on CUDA 0.9 of free memory.
    memory_budget: int | float | str | None = None
    # Arena page size; None: 2 MiB, or the smallest power of two that holds one KV block of the
    # largest model (a block holds block_size tokens of every layer: 13 MiB for a 13B model).
    page_bytes: int | None = None
    block_size: int = 16
    # Automatic prefix caching: full KV blocks are shared by requests with the same prefix (per
    # model) and kept, unreferenced, until their memory is needed.
    prefix_caching: bool = True
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    seed: int = 0
    # What to do when KV cache runs out: recompute | swap | static (fixed per-model KV shares) |
    # oneiros (remap parameter memory into KV cache first, then fall back to remap_fallback).
    policy: str = "recompute"
    remap_fallback: str = "recompute"  # recompute | swap | pie
    max_remap_fraction: float = 0.9  # a model never has more of its layers non-resident (1: no cap)
    donor_order: str = "mru"  # inactive models give layers most (mru) or least (lru) recently run first
    revert: bool = True  # dynamic reversion: give remapped memory back to parameters when idle
    prefetch_distance: int = 2  # borrowed slabs per pass: 1 -> alpha+1 copies, 2 -> alpha+2
    revert_reserve: float = 0.25  # revert only while free KV >= this x KV in use (+ one layer)
    revert_hold_steps: int = 8  # ... for this many consecutive steps (hysteresis)
    # temporal: one model per step, in turns of turn_steps steps (round robin, and a model not offered
    # a step for max_wait_s goes next); spatial: every model with work in each step.
    sharing: str = "temporal"
    max_wait_s: float = 1.0
    turn_steps: int = 8
    # ... and before a step that would take it past turn_max_s seconds at its pace, unless the
    # model streams lent layers in its passes (None: steps only, the default: on the A100 grid a
    # 0.16 s limit evens pooled TBT on the C1 rows, but the H100-PCIe C1 16 req/s row loses it;
    # see docs/paper_reproduction.md).
    turn_max_s: float | None = None
    # Share of a pass its streamed copies may leave exposed (the replayed plan sets alpha by it).
    stream_exposure_target: float = 0.02
    # Remapping serves running requests that would otherwise be preempted (the paper's "when");
    # True lets admitting a request also remap layers of models not running (a bigger batch,
    # longer decode steps: measured worse on TPOT in benchmarks/paper.py's grid).
    remap_on_admit: bool = False
    # A request that has waited this long since it arrived (seconds) may take them anyway, while
    # there is no backlog (at most half as many requests wait as run): a bound on how long a
    # transient shortage (a long prompt at the head of the queue) keeps requests queued when
    # layers of models not running could hold their KV cache. None: never (only remap_on_admit).
    # 0.5 s chosen on benchmarks/paper.py's grid (docs/paper_reproduction.md).
    admit_remap_after_s: float | None = 0.5
    # A model with work waiting for its turn lends no more layers than its passes hide (with the
    # fraction cap, the paper's per-model cap); off: it lends up to max_remap_fraction (ablation).
    cap_waiting: bool = True
    # Temporal sharing: models waiting for a turn that is not next lend every layer (most recently
    # run first), the next model's layers come back on the copy stream during the current turn, and
    # the turn lasts until they are back (at least turn_steps). auto: on when the weights do not all
    # fit the arena; on: also when they do (parameter memory of waiting models becomes KV cache).
    turn_reload: str = "auto"
    # Host bytes for pinned master copies of the weights; models beyond it (in config order) keep
    # theirs in a memory-mapped file, the cold tier, read at cold_bytes_per_s when a layer comes
    # back. None: the hardware profile's host memory (sim), unlimited (torch).
    host_memory_budget: int | str | None = None
    cold_bytes_per_s: float | None = None  # None: the profile's cold tier (sim), the host link
    # Admissions (new requests, and preempted ones resuming) leave this share of the KV cache (its
    # size at start-up) free while requests run, as vLLM V0's block manager does (default 0.01
    # there, and here): a request admitted into the last free blocks is preempted by the next
    # steps' growth. Free means what admissions may still draw on: free pages, other models' idle
    # KV, and layers where admissions take them (loaded on demand, or remap_on_admit). 0: off.
    kv_watermark: float = 0.01
    # Admissions also leave room for every running request (of every model sharing the memory) to
    # grow by this many tokens, counting what growth can draw on: free pages, idle KV and, under
    # oneiros, the layers remapping would give running requests (within the caps). Remapping
    # replaces preemption only while running requests find memory; a request admitted beyond
    # that is preempted again a few steps later. None: 32 under policy oneiros (chosen on
    # benchmarks/paper.py's grid, see docs/paper_reproduction.md), 0 otherwise (vLLM V0 admits
    # on its watermark alone).
    growth_reserve_tokens: int | None = None
    swap_space: int | str = 1 * GiB  # host bytes for swapped-out KV blocks (swap policy)
    trace_steps: str | None = None  # path of a JSONL file that records every engine step
    attention: str = "auto"  # auto | torch | triton (see oneiros.attention)
    # Decode steps replay CUDA graphs captured per batch size (padded up to the nearest); CUDA only.
    cuda_graphs: bool = True
    # Host bytes/s of a layer copy (the controller's T_T); None: measured at start-up (and cached).
    h2d_bytes_per_s: float | None = None
    # torch: run the models; sim: a cost model of `hardware` advances a virtual clock (no tensors).
    executor: str = "torch"
    # sim: a profile name (oneiros.sim.hardware), a profile JSON path, or a HardwareProfile
    hardware: Any = None
    # sim: each step's compute time is multiplied by a log-normal factor of this sigma (a machine's
    # step-to-step noise: `calibrate` reports it as noise_rms_relative), drawn from `seed`. 0: none.
    sim_noise: float = 0.0

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("at least one model is needed")
        for name in self.models:
            if not re.fullmatch(r"[A-Za-z0-9._:/@-]+", name):
                raise ConfigError(f"model name {name!r} may use letters, digits and ._:/@- only")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.page_bytes is not None and (self.page_bytes < 4096 or self.page_bytes % 4096):
            raise ConfigError(f"page_bytes must be a multiple of 4096, got {self.page_bytes}")
        if not 0.0 <= self.sim_noise < 1.0:
            raise ConfigError(f"sim_noise must be in [0, 1), got {self.sim_noise}")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, not {self.dtype!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.remap_fallback not in ("recompute", "swap", "pie"):
            raise ConfigError(
                f"remap_fallback must be recompute, swap or pie, not {self.remap_fallback!r}")
        if self.growth_reserve_tokens is not None and self.growth_reserve_tokens < 0:
            raise ConfigError(
                f"growth_reserve_tokens must be >= 0, got {self.growth_reserve_tokens}"
            )
        if not 0.0 <= self.kv_watermark < 1.0:
            raise ConfigError(f"kv_watermark must be in [0, 1), got {self.kv_watermark}")
        if not 0.0 <= self.max_remap_fraction <= 1.0:
            raise ConfigError(f"max_remap_fraction must be in [0, 1], got {self.max_remap_fraction}")
        if self.donor_order not in ("mru", "lru"):
            raise ConfigError(f"donor_order must be mru or lru, not {self.donor_order!r}")
        if self.attention not in ("auto", "torch", "triton"):
            raise ConfigError(f"attention must be auto, torch or triton, not {self.attention!r}")
        if self.executor not in ("torch", "sim"):
            raise ConfigError(f"executor must be torch or sim, not {self.executor!r}")
        if self.executor == "sim" and not self.hardware:
            raise ConfigError("the sim executor needs a hardware profile (hardware=...)")
        if self.prefetch_distance not in (1, 2):
            raise ConfigError(f"prefetch_distance must be 1 or 2, got {self.prefetch_distance}")
        if self.h2d_bytes_per_s is not None and not self.h2d_bytes_per_s > 0:
            raise ConfigError(f"h2d_bytes_per_s must be positive, got {self.h2d_bytes_per_s}")
        if self.turn_max_s is not None and not self.turn_max_s > 0:
            raise ConfigError(f"turn_max_s must be positive, got {self.turn_max_s}")
        if self.admit_remap_after_s is not None and not self.admit_remap_after_s >= 0:
            raise ConfigError(
                f"admit_remap_after_s must be at least 0, got {self.admit_remap_after_s}"
            )
        if self.turn_steps < 1:
            raise ConfigError(f"turn_steps must be at least 1, got {self.turn_steps}")
        if not 0.0 <= self.stream_exposure_target < 1.0:
            raise ConfigError(
                f"stream_exposure_target must be in [0, 1), got {self.stream_exposure_target}"
            )
        if self.revert_reserve < 0 or self.revert_hold_steps < 1:
            raise ConfigError("revert_reserve must be >= 0 and revert_hold_steps >= 1")
        if self.turn_reload not in ("auto", "on", "off"):
            raise ConfigError(f"turn_reload must be auto, on or off, not {self.turn_reload!r}")
        if self.sharing not in ("temporal", "spatial"):
            raise ConfigError(f"sharing must be temporal or spatial, not {self.sharing!r}")
        if self.host_memory_budget is not None:
            host = parse_bytes(self.host_memory_budget)
            if not isinstance(host, int) or host < 0:
                raise ConfigError(
                    f"host_memory_budget must be a byte count, got {self.host_memory_budget!r}")
            object.__setattr__(self, "host_memory_budget", host)
        if self.cold_bytes_per_s is not None and not self.cold_bytes_per_s > 0:
            raise ConfigError(f"cold_bytes_per_s must be positive, got {self.cold_bytes_per_s}")
        swap = parse_bytes(self.swap_space)
        if not isinstance(swap, int) or swap < 0:
            raise ConfigError(f"swap_space must be a byte count, got {self.swap_space!r}")
        object.__setattr__(self, "swap_space", swap)
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget))

    @property
    def growth_reserve(self) -> int:
        """growth_reserve_tokens, its default resolved by policy."""
        if self.growth_reserve_tokens is not None:
            return self.growth_reserve_tokens
        return GROWTH_RESERVE_TOKENS if self.policy == "oneiros" else 0


def free_device_memory(device: str) -> int:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
