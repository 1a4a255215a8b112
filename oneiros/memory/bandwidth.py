"""Host <-> device copy bandwidth, measured once at start-up: the remapping controller's T_T (the
time to copy one layer slab in) is a layer's bytes over the host-to-device figure.

Four figures, from pinned host memory on CUDA:
  h2d, d2h              one direction alone;
  mixed_h2d, mixed_d2h  each direction while the other one runs (swap-outs of one model's KV while
                        another model's layers stream in share the link; PCIe is full duplex, but
                        the copy engines and host memory are not always).
On CUDA each copy runs on its own stream and is timed with events; the best of `repeats` is kept.
On a CPU "device" the copies are memcpy within host memory, timed on the wall clock.

CUDA figures are cached per GPU model in the cache directory (`bandwidth.json`), so a restart does
not probe again; a CPU is probed every time (cheap, and its figure depends on the load).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MiB = 1 << 20


@dataclass(frozen=True)
class Bandwidth:
    device: str  # what was measured, e.g. "cuda:NVIDIA H100 80GB HBM3" or "cpu"
    nbytes: int  # bytes per copy
    h2d: float  # bytes/s
    d2h: float
    mixed_h2d: float
    mixed_d2h: float

    def describe(self) -> str:
        g = 1e9
        return (
            f"{self.device}: h2d {self.h2d / g:.1f} GB/s, d2h {self.d2h / g:.1f} GB/s, "
            f"mixed {self.mixed_h2d / g:.1f} + {self.mixed_d2h / g:.1f} GB/s"
        )


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def probe(device: torch.device | str, nbytes: int = 64 * MiB, repeats: int = 5) -> Bandwidth:
    """Measure the four figures with copies of `nbytes` each."""
    device = torch.device(device)
    if nbytes <= 0 or repeats <= 0:
        raise ValueError("nbytes and repeats must be positive")
    pin = device.type == "cuda"
    host_src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pin)
    host_dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    dev_dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev_src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        times = _cuda_times(device, host_src, host_dst, dev_src, dev_dst, repeats)
    else:
        times = _host_times(host_src, host_dst, dev_src, dev_dst, repeats)
    h2d, d2h, mixed_h2d, mixed_d2h = (nbytes / max(t, 1e-9) for t in times)
    return Bandwidth(device_key(device), nbytes, h2d, d2h, mixed_h2d, mixed_d2h)


def _host_times(host_src, host_dst, dev_src, dev_dst, repeats) -> tuple[float, ...]:
    def best(fn) -> float:
        out = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return out

    h2d = best(lambda: dev_dst.copy_(host_src))
    d2h = best(lambda: host_dst.copy_(dev_src))
    both = best(lambda: (dev_dst.copy_(host_src), host_dst.copy_(dev_src)))
    return h2d, d2h, both, both  # one memory system: each direction gets the pair's time


def _cuda_times(device, host_src, host_dst, dev_src, dev_dst, repeats) -> tuple[float, ...]:
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def timed(stream: torch.cuda.Stream, dst: torch.Tensor, src: torch.Tensor):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            t0.record()
            dst.copy_(src, non_blocking=True)
            t1.record()
        return t0, t1

    def best(pairs_per_run) -> list[float]:
        out: list[float] = []
        for _ in range(repeats + 1):  # the first run warms up (allocations, driver paths)
            torch.cuda.synchronize(device)
            pairs = pairs_per_run()
            torch.cuda.synchronize(device)
            secs = [a.elapsed_time(b) / 1e3 for a, b in pairs]
            out = secs if not out else [min(x, y) for x, y in zip(out, secs)]
        return out

    (h2d,) = best(lambda: [timed(up, dev_dst, host_src)])
    (d2h,) = best(lambda: [timed(down, host_dst, dev_src)])
    mixed_h2d, mixed_d2h = best(
        lambda: [timed(up, dev_dst, host_src), timed(down, host_dst, dev_src)]
    )
    return h2d, d2h, mixed_h2d, mixed_d2h


def cached_probe(device: torch.device | str, cache: Path | None = None) -> Bandwidth:
    """The probe's figures for this device: from the cache file for a known GPU model, else
    measured now (and stored, for a GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return probe(device, nbytes=16 * MiB, repeats=3)
    if cache is None:
        from oneiros.models.loader import cache_dir

        cache = cache_dir() / "bandwidth.json"
    return load_or_measure(cache, device_key(device), lambda: probe(device))


def load_or_measure(cache: Path, key: str, measure: Callable[[], Bandwidth]) -> Bandwidth:
    """Figures stored under `key` in the JSON file `cache`, else `measure()` stored there (a
    cache that cannot be read is measured over; one that cannot be written costs a probe later)."""
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    try:
        return Bandwidth(**known[key])
    except (KeyError, TypeError):
        pass
    bw = measure()
    known[key] = asdict(bw)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    except OSError:
        pass
    return bw
