"""Engine time. The real engine reads the wall clock; the simulator's clock is virtual and moves only
when the simulated executor says a step took so long (or the runner waits for the next arrival)."""

from __future__ import annotations

import time


class Clock:
    """Wall-clock seconds (perf_counter); every timestamp the engine records comes from here."""

    def now(self) -> float:
        return time.perf_counter()

    def wait_until(self, t: float) -> None:
        """Idle until time t (the next request's arrival)."""
        dt = t - self.now()
        if dt > 0:
            time.sleep(dt)

    def advance(self, dt: float) -> None:
        """Only the virtual clock moves on request; the wall clock moves by itself."""


class VirtualClock(Clock):
    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def wait_until(self, t: float) -> None:
        self.t = max(self.t, t)

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"time cannot go back ({dt} s)")
        self.t += dt
