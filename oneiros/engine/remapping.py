"""RemapController: applies the pure decisions of `memory/remap.py` to the tenants' accounting.

It is consulted at three points of a step, all during planning:
  - `take(requester, pages)`: the arbiter found no idle KV page anywhere; free `pages` arena pages by
    remapping layer slabs (before any preemption);
  - `prepare(tenant)`: a model is about to run with non-resident layers; if streaming them cannot hide
    under its compute (alpha > alpha_max), restore layers first while free memory allows;
  - `after_step(order)`: dynamic reversion: when KV memory has stayed free for a while, restore
    layers, the model most likely to run next first.
It changes residency in the accounting and records each change as a memory action of the step
(`EvictLayer`, `RestoreLayer`, `MoveLayer`); the executor moves the bytes. Torch-free.
T_T comes from the start-up copy probe (`memory/bandwidth.py`); T_compute from a running average of
each model's step time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oneiros.core import EvictLayer, MoveLayer, RestoreLayer, Step
from oneiros.memory.arena import OwnerKind, PageArena
from oneiros.memory.remap import (
    DonorInfo,
    Hysteresis,
    alpha_cap,
    max_alpha,
    next_donor,
    removal_order,
    restore_priority,
    should_revert,
)

if TYPE_CHECKING:
    from oneiros.engine.tenant import Tenant


class RemapController:
    def __init__(
        self,
        tenants: dict[str, Tenant],
        arena: PageArena,
        sharing: str,
        max_remap_fraction: float,
        revert_reserve: float,
        revert_hold_steps: int,
        h2d_bytes_per_s: float,
        donor_order: str = "mru",
        revert: bool = True,
        prefetch_distance: int = 0,
    ) -> None:
        self.tenants = tenants
        self.arena = arena
        self.sharing = sharing
        self.max_remap_fraction = max_remap_fraction
        self.revert_reserve = revert_reserve
        self.hysteresis = Hysteresis(revert_hold_steps)
        self.h2d_bytes_per_s = h2d_bytes_per_s
        self.donor_order = donor_order
        self.prefetch_distance = prefetch_distance  # copies per pass beyond alpha
        self.revert = revert
        self._order = {n: removal_order(t.num_layers) for n, t in tenants.items()}
        self._backoff: dict[str, int] = {}  # prepare() calls to skip restoring, per model
        self._step_s: dict[tuple[str, bool], float] = {}  # EMA per (model, decode-only step)
        self.step = Step(0.0)  # where this step's memory actions go (`begin`)

    def begin(self, step: Step) -> None:
        """Memory actions decided from now on belong to `step`."""
        self.step = step

    # ---- measurements ---------------------------------------------------------------------------
    def layer_copy_s(self, t: Tenant) -> float:
        return t.residency.layer_bytes / self.h2d_bytes_per_s

    def observe_step(self, name: str, compute_s: float, decode_only: bool = True) -> None:
        """Fold a step's compute time (its elapsed time less exposed copy time) into the running
        estimate of its shape: decode-only steps, or steps with prefill (much longer)."""
        key = (name, decode_only)
        old = self._step_s.get(key)
        self._step_s[key] = compute_s if old is None else 0.8 * old + 0.2 * compute_s

    def alpha_max(self, t: Tenant) -> int:
        """Layers this model may stream per pass with the copies hidden (0 until measured). The
        decode estimate rules when there is one: a step with prefill hides more, but the steps that
        follow it are decodes, and the layers stay missing for them too."""
        step = self._step_s.get((t.name, True), self._step_s.get((t.name, False)))
        if step is None:
            return 0
        return max_alpha(self.layer_copy_s(t), step, t.num_layers, self.prefetch_distance)

    def _donor(self, t: Tenant) -> DonorInfo:
        n = t.num_layers
        cap = alpha_cap(n, self.max_remap_fraction)
        if t.state.active:
            cap = min(cap, self.alpha_max(t))
        return DonorInfo(
            t.name, t.state.active, t.state.last_run, n, len(t.residency.missing_layers), cap
        )

    def remappable_pages(self) -> int:
        """Pages that remapping could still free, every model at its cap (for admission checks)."""
        total = 0
        for t in self.tenants.values():
            cap = alpha_cap(t.num_layers, self.max_remap_fraction)
            total += max(0, cap - len(t.residency.missing_layers)) * t.residency.pages_per_layer
        return total

    # ---- remap ----------------------------------------------------------------------------------
    def take(self, requester: str, pages: int, exclude: str | None = None) -> int:
        """Free at least `pages` arena pages by remapping layers (of any model but `exclude`);
        returns the pages freed."""
        freed = 0
        while freed < pages:
            donors = [self._donor(t) for t in self.tenants.values() if t.name != exclude]
            name = next_donor(donors, self.sharing, self.donor_order)
            if name is None:
                break
            t = self.tenants[name]
            freed += self._evict(t, self._next_to_remove(t))
        return freed

    def _evict(self, t: Tenant, layer: int) -> int:
        pages = t.residency.evict(layer)
        self.step.memory.append(EvictLayer(t.name, layer, tuple(pages)))
        return len(pages)

    def _next_to_remove(self, t: Tenant) -> int:
        """The first resident layer in the removal order (the missing set is usually a prefix of
        it; a layer taken out of turn to make a contiguous run is skipped)."""
        slabs = t.residency.slab_pages
        return next(i for i in self._order[t.name] if slabs[i] is not None)

    def _next_to_restore(self, t: Tenant) -> int:
        slabs = t.residency.slab_pages
        return next(i for i in reversed(self._order[t.name]) if slabs[i] is None)

    def _make_run(self, t: Tenant, pages: int) -> bool:
        """Free a contiguous run of `pages` for t by remapping one layer of another model whose
        slab, with the free pages around it, spans such a run (inactive models first, MRU)."""
        arena = self.arena
        donors = (self._donor(x) for x in self.tenants.values() if x.name != t.name)
        order = sorted(
            (d for d in donors if d.num_missing < d.alpha_cap), key=lambda d: (d.active, -d.last_run)
        )
        for d in order:
            x = self.tenants[d.name]
            for layer, run in enumerate(x.residency.slab_pages):
                if run is None or layer == 0:
                    continue
                lo, hi = run[0], run[-1]
                while lo > 0 and arena.owner(lo - 1).kind is OwnerKind.FREE:
                    lo -= 1
                while hi + 1 < arena.num_pages and arena.owner(hi + 1).kind is OwnerKind.FREE:
                    hi += 1
                if hi - lo + 1 >= pages:
                    self._evict(x, layer)
                    return True
        return False

    # ---- restore --------------------------------------------------------------------------------
    def _restore_one(self, t: Tenant, displace: bool = False) -> bool:
        """Restore the most recently remapped layer of t, freeing idle KV pages if needed, then
        compacting slabs, then (`displace`: t is about to run) remapping another model's layer
        whose slab makes room."""
        if not t.residency.missing_layers:
            return False
        layer = self._next_to_restore(t)
        ppl = t.residency.pages_per_layer
        pages = t.residency.restore(layer)
        if pages is None:
            for other in self.tenants.values():
                other.pool.shrink()
            pages = t.residency.restore(layer)
            if pages is None and self._compact(ppl):
                pages = t.residency.restore(layer)
            if pages is None and displace and self._make_run(t, ppl):
                pages = t.residency.restore(layer)
            if pages is None:
                self.step.notes[t.name, "restore_failures"] += 1
                return False
        self.step.memory.append(RestoreLayer(t.name, layer, tuple(pages)))
        return True

    def prepare(self, t: Tenant) -> None:
        """Before a model with non-resident layers runs: restore layers while streaming would not
        hide under its compute and there is memory to do it; record which way it went."""
        missing = len(t.residency.missing_layers)
        if not missing:
            return
        limit = self.alpha_max(t)
        restored = False
        ppl = t.residency.pages_per_layer
        wait = self._backoff.get(t.name, 0)
        if wait:  # a restore failed lately: stream for a while rather than retry every step
            self._backoff[t.name] = wait - 1
            limit = len(t.residency.missing_layers)
        while len(t.residency.missing_layers) > limit:
            # Memory for one more layer: free pages, else the layers of models not running now
            # (the parameter deficit moves to them: one copy now instead of one every pass).
            short = ppl - self._free_pages()
            if short > 0 and self.take(t.name, short, exclude=t.name) < short:
                self._backoff[t.name] = self.hysteresis.hold_steps
                break
            if not self._restore_one(t, displace=True):
                self._backoff[t.name] = self.hysteresis.hold_steps
                break
            restored = True
        if t.state.reactivating:
            t.state.reactivating = False
            kind = "reactivations_restored" if restored else "reactivations_streamed"
            self.step.notes[t.name, kind] += 1

    def restore_all(self, next_to_run: list[str]) -> int:
        """Restore layers, the model most likely to run next first, until none is missing or
        memory runs out (the engine is idle)."""
        restored = 0
        donors = [self._donor(t) for t in self.tenants.values()]
        for name in restore_priority(donors, next_to_run):
            t = self.tenants[name]
            while t.residency.missing_layers and self._free_pages() >= t.residency.pages_per_layer:
                if not self._restore_one(t):
                    break
                restored += 1
        return restored

    def after_step(self, next_to_run: list[str]) -> None:
        if not self.revert:
            return
        donors = [self._donor(t) for t in self.tenants.values()]
        order = restore_priority(donors, next_to_run)
        if not order:
            self.hysteresis.streak = 0
            return
        t = self.tenants[order[0]]
        in_use = sum(x.pool.num_busy_pages for x in self.tenants.values())
        ok = should_revert(
            self._free_pages(), t.residency.pages_per_layer, in_use, self.revert_reserve
        )
        if self.hysteresis.update(ok):
            self._restore_one(t)
            self.hysteresis.streak = 0  # one layer per hold period, and a failure waits as long

    def _compact(self, pages: int) -> bool:
        """Enough pages are free but no run of `pages`: move resident layer slabs (re-copied from
        their host copies) so the free pages join. False when no such move exists."""
        moves = self.arena.plan_compaction(pages)
        if moves is None:
            return False
        for owner, _, dest in moves:
            t = self.tenants[owner.model]
            old = t.residency.move(owner.layer, dest)
            self.step.memory.append(MoveLayer(t.name, owner.layer, tuple(old), tuple(dest)))
        return True

    # ---- helpers --------------------------------------------------------------------------------
    def _free_pages(self) -> int:
        """Free arena pages plus KV pages without a live block (shrinkable at once)."""
        return self.arena.num_free + sum(t.pool.num_idle_pages for t in self.tenants.values())
