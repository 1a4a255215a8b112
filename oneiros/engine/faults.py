"""Fault injection for tests and drills: what a request sees when the engine fails.

A spec names faults and their rates, from `--faults` or the ONEIROS_FAULTS environment variable:

    copy:0.01,restore:0.01,step:0.01,slow:0.05@0.2,crash:1*1

- `copy`: a host-to-device copy of a streamed layer fails (memory/transfer.py);
- `restore`: restoring a remapped layer fails before it touches anything (memory/weights.py);
- `kv_move`: moving KV pages on the device (compaction) fails before it copies anything
  (engine/executor.py);
- `step`: the model step raises after the step was planned (blocks allocated), around the executor;
- `slow`: the step first sleeps `@SECONDS` (default 0.2);
- `crash`: the engine's loop dies (a BaseException the loop does not catch), for supervisor drills.

RATE is the probability per call at the fault's site; `*N` caps how many times it fires. Draws come
from one generator seeded by `--faults-seed` / ONEIROS_FAULTS_SEED (default 0), so a run repeats.
Nothing is read at import: `configure()` installs a plan (the server calls it at start-up), and
`maybe(site)` is a no-op until then.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from oneiros.core import ConfigError

KINDS = ("copy", "restore", "kv_move", "step", "slow", "crash")
# Which kinds a call site can fire, in the order they are tried.
SITES = {
    "copy": ("copy",), "restore": ("restore",), "kv_move": ("kv_move",),
    "step": ("slow", "crash", "step"),
}


class InjectedFault(RuntimeError):
    """A fault fired by the injector (never raised in normal operation)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"injected fault: {kind}")
        self.kind = kind


class InjectedCrash(BaseException):
    """An injected crash of the engine loop: a BaseException, so that `except Exception` in the
    loop does not absorb it and the loop dies as it would on a real fatal error."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rate: float
    seconds: float = 0.2  # slow only
    limit: int | None = None  # fire at most this many times


@dataclass
class FaultPlan:
    faults: dict[str, Fault]
    seed: int = 0
    fired: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def hit(self, site: str) -> None:
        for kind in SITES.get(site, ()):
            f = self.faults.get(kind)
            if f is None:
                continue
            with self._lock:
                self.calls[kind] += 1
                capped = f.limit is not None and self.fired[kind] >= f.limit
                fire = not capped and self._rng.random() < f.rate
                if fire:
                    self.fired[kind] += 1
            if not fire:
                continue
            if kind == "slow":
                time.sleep(f.seconds)
            elif kind == "crash":
                raise InjectedCrash("injected fault: crash (the engine loop dies)")
            else:
                raise InjectedFault(kind)

    @property
    def spec(self) -> str:
        parts = []
        for f in self.faults.values():
            s = f"{f.kind}:{f.rate:g}"
            if f.kind == "slow":
                s += f"@{f.seconds:g}"
            if f.limit is not None:
                s += f"*{f.limit}"
            parts.append(s)
        return ",".join(parts)


def parse(spec: str, seed: int = 0) -> FaultPlan:
    """'step:0.01,slow:0.05@0.2' -> FaultPlan. ConfigError names the part that is wrong."""
    faults: dict[str, Fault] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        kind, sep, rest = part.partition(":")
        if kind not in KINDS or not sep:
            raise ConfigError(
                f"fault {part!r}: expected KIND:RATE[@SECONDS][*N] with KIND one of "
                f"{', '.join(KINDS)}"
            )
        rest, _, limit = rest.partition("*")
        rate_s, _, secs = rest.partition("@")
        try:
            rate = float(rate_s)
            seconds = float(secs) if secs else 0.2
            cap = int(limit) if limit else None
        except ValueError:
            raise ConfigError(f"fault {part!r}: RATE, SECONDS and N must be numbers") from None
        if not 0.0 <= rate <= 1.0 or seconds < 0 or (cap is not None and cap < 1):
            raise ConfigError(f"fault {part!r}: RATE in [0, 1], SECONDS >= 0, N >= 1")
        faults[kind] = Fault(kind, rate, seconds, cap)
    return FaultPlan(faults, seed)


_active: FaultPlan | None = None


def configure(spec: str | None = None, seed: int | None = None) -> FaultPlan | None:
    """Install the plan of `spec` (default: ONEIROS_FAULTS; empty or unset: no faults) and return
    it. `seed` defaults to ONEIROS_FAULTS_SEED, else 0."""
    global _active
    if spec is None:
        spec = os.environ.get("ONEIROS_FAULTS", "")
    if seed is None:
        try:
            seed = int(os.environ.get("ONEIROS_FAULTS_SEED", "0"))
        except ValueError:
            raise ConfigError("ONEIROS_FAULTS_SEED must be an integer") from None
    _active = parse(spec, seed) if spec.strip() else None
    return _active


def install(plan: FaultPlan | None) -> None:
    """Install a plan (None: no faults). Tests use this and restore the previous plan after."""
    global _active
    _active = plan


def active() -> FaultPlan | None:
    return _active


_suspended = threading.local()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No fault fires on this thread inside the block (the repair after a fault, say)."""
    before = getattr(_suspended, "on", False)
    _suspended.on = True
    try:
        yield
    finally:
        _suspended.on = before


def maybe(site: str) -> None:
    """Fire the faults of `site` ('copy', 'restore' or 'step') at their rates; a no-op without a
    plan (or inside `suspended()`). Raises InjectedFault (or InjectedCrash), or sleeps for
    `slow`."""
    plan = _active
    if plan is not None and not getattr(_suspended, "on", False):
        plan.hit(site)
