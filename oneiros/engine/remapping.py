"""RemapController: applies the pure decisions of `memory/remap.py` to the tenants' accounting.

It is consulted during planning only:
  - `take(requester, pages)`: the arbiter found no idle KV page anywhere; free `pages` arena pages by
    remapping layer slabs, models not running first (before any preemption). A request being
    admitted may take only from models not running: admission never adds copies to a pass;
  - `prepare(tenant)`: a model is about to run; if streaming its missing layers would not hide
    under its compute (more than alpha_max missing), restore layers first while memory allows,
    taking them from models not running; move a misplaced layer when the exposure it saves pays
    for its copy;
  - `prefetch(tenant)`: the model whose turn comes next gets layers back into free memory ahead
    of its turn (the copies overlap the current model's passes);
  - `reclaim_due(tenant)`: rent or buy: a model about to run whose passes mostly wait for lent
    layers, and have waited as long as bringing them back costs, buys them back (the planner has
    the arbiter preempt requests of models out of their turn for the pages; the layers come
    back in the memory step after the step);
  - `after_step(order)`: dynamic reversion: once KV memory has stayed free for a while, restore as
    many layers as the free memory and a copy budget (what the last pass could hide) allow, the
    model most likely to run next first; `restore_all(order)` when no request is left.
Oversubscribed (more weights than the arena holds, see `engine/placement.py`): a model without work
may give every layer (it is then fully off the device but for its resident run); a model runs once
its layer 0 is back and no more is missing than its passes hide (`runnable`); admissions and the
next model's prefetch take idle models' layers. `whole_models` is the offload baseline: idle models
go whole, a model is loaded whole before it runs.
Turn reloads (temporal sharing; on by default when oversubscribed, `turn_reload`): a model waiting
for a turn that is not the next one lends every layer (most recently run first: its turn is
furthest away), layer 0 too unless requests of it are running (then it can always run by streaming:
a model holding KV cache but not a single layer could keep every model from loading), to the
running model's KV cache, to admissions and to the next model's prefetch; the next model, and a
model offered in this step that could not run, keep theirs. The planner makes each turn last the
steps it takes to copy back the largest deficit of a waiting model (`turn_quantum`) and holds it
while the next model's copies are still on the link (`reloading`), so that the copies hide under
the turn before: the weights of the models with work need not fit at once, only those of the
running and the next one, and the rest of the memory is KV cache.
A restore needs a contiguous run of pages. When enough pages are free but none is long enough, idle
KV pages go back first; then the KV pages of the window that holds the fewest move to free pages
elsewhere (device copies of a few pages; the blocks are renumbered in the requests' tables and the
prefix cache; only before the step's first KV swap, see `kv_moves_ok`); then resident slabs are
packed (each a host copy of a whole layer); then, for a model about to run, another model's layer
that spans a run is remapped.
It changes residency in the accounting and records each change as a memory action of the step
(`EvictLayer`, `RestoreLayer`, `MoveLayer`, `MoveKV`); the executor moves the bytes. Torch-free.

T_T comes from the start-up copy probe (`memory/bandwidth.py`) or the hardware profile; T_compute
from running averages of each model's decode steps and, apart, of steps with prefill. Measured
exposure (copy time a pass waited for) above the target lowers alpha until it falls again.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

from oneiros.core import EvictLayer, MoveKV, MoveLayer, RestoreLayer, Step
from oneiros.engine.tenancy import POPULARITY_HALF_LIFE_S
from oneiros.memory.arena import OwnerKind, PageArena
from oneiros.memory.remap import (
    DonorInfo,
    Hysteresis,
    alpha_cap,
    decay,
    max_alpha,
    next_donor,
    next_to_evict,
    next_to_restore,
    rebalance,
    restore_priority,
    revert_shortfall,
    should_revert,
)

if TYPE_CHECKING:
    from oneiros.engine.tenant import Tenant

REBALANCE_HORIZON = 64  # passes a layout is expected to last, when weighing a move against its copy
EMA = 0.2  # weight of a new measurement in the step-time and exposure averages
# A lent layer brought back while KV cache holds its memory costs its own copy and the displaced
# KV cache's trip to host and back: three copies of a layer's bytes on the link.
RECLAIM_COPIES = 3
# ... and preempts requests of other models (their TPOT pays the stall): only for a model whose
# passes wait for copies at least this share of their time (streaming at least doubles them).
RECLAIM_EXPOSED = 0.5


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
        prefetch_distance: int = 2,
        max_exposed: float = 0.02,
        cap_waiting: bool = True,
        oversubscribed: bool = False,
        whole_models: bool = False,
        turn_reload: bool = False,
        copy_bytes_per_s: dict[str, float] | None = None,
    ) -> None:
        self.tenants = tenants
        self.arena = arena
        self.sharing = sharing
        self.max_remap_fraction = max_remap_fraction
        self.revert_reserve = revert_reserve
        self.hysteresis = Hysteresis(revert_hold_steps)
        self.h2d_bytes_per_s = h2d_bytes_per_s
        # Models whose host copies are in the cold tier copy layers in at this rate instead.
        self.copy_bytes_per_s = dict(copy_bytes_per_s or {})
        self.donor_order = donor_order
        self.prefetch_distance = prefetch_distance  # borrowed slabs per pass (alpha + d copies)
        self.revert = revert
        self.max_exposed = max_exposed  # share of a pass its copies may leave exposed
        self.cap_waiting = cap_waiting  # models waiting for their turn lend what they hide only
        # More weights than the arena holds: a model without work may give every layer (layer 0
        # too), and a model cannot run before its layer 0 is back (see `runnable`).
        self.oversubscribed = oversubscribed
        # The offload baseline: only idle models give, all their layers; a model runs with every
        # layer resident; no streaming, no loading ahead, no reversion.
        self.whole_models = whole_models
        # Temporal turns that reload: a model waiting for a turn that is not the next one lends
        # every layer (it gets them back ahead of its turn, see `prefetch` and `reloading`).
        self.turn_reload = turn_reload
        # Either way a model's weights come and go with its work: a model runs only with what its
        # passes hide missing, and admissions and prefetches take the layers of models not using
        # them (see `runnable`, `prefetch` and the arbiter).
        self.loads_on_demand = oversubscribed or turn_reload
        self.next_up: str | None = None  # whose turn comes next (the planner sets it)
        self._link_free = 0.0  # when the copies issued so far are expected to be done
        self._ready: dict[str, float] = {}  # per model: when its last restore should land
        self._offered: set[str] = set()  # models prepared in this step (see `_donor`)
        self._backoff: dict[str, int] = {}  # prepare() calls to skip restoring, per model
        self._step_s: dict[tuple[str, bool], float] = {}  # EMA per (model, decode-only step)
        self._exposed: dict[str, float] = {}  # EMA of the exposed share of decode passes
        self._penalty: dict[str, int] = {}  # layers alpha is lowered by after measured exposure
        self._calm: dict[str, int] = {}  # decode steps in a row with little exposure
        self._rent: dict[str, float] = {}  # exposure beyond the target share, decayed (rent)
        self._reclaim: dict[str, int] = {}  # layers to restore after this step (`reclaim_due`)
        self.step = Step(0.0)  # where this step's memory actions go (`begin`)
        # KV pages may move (`MoveKV`) while the step holds no KV swap: the planner lowers it
        # once one is planned (a swap planned earlier would name blocks by their old pages).
        self.kv_moves_ok = True

    def begin(self, step: Step) -> None:
        """Memory actions decided from now on belong to `step`."""
        self.step = step
        self._offered = set()
        self.kv_moves_ok = True

    # ---- measurements ---------------------------------------------------------------------------
    def layer_copy_s(self, t: Tenant) -> float:
        """One layer copy, with the link shared by every running model that streams."""
        sharers = sum(
            1 for x in self.tenants.values() if x.state.running and x.residency.missing_layers
        )
        return self.copy_s(t) * max(1, sharers)

    def copy_s(self, t: Tenant) -> float:
        """One layer of t copied in alone: from pinned host memory, or from the cold tier."""
        bw = min(self.h2d_bytes_per_s, self.copy_bytes_per_s.get(t.name, self.h2d_bytes_per_s))
        return t.residency.layer_bytes / bw

    def observe_step(
        self, name: str, compute_s: float, decode_only: bool = True, exposed_s: float = 0.0
    ) -> None:
        """Fold a pass's compute time (its elapsed time less exposed copy time) into the running
        estimate of its shape (decode-only, or with prefill: much longer, kept apart), and a decode
        pass's exposed share into the exposure feedback: when passes that stream no more than the
        replay allows still wait for copies (the estimate is off: other copies on the link, a
        slower link than probed), alpha goes down a layer; when they stop waiting, back up."""
        key = (name, decode_only)
        old = self._step_s.get(key)
        self._step_s[key] = compute_s if old is None else (1 - EMA) * old + EMA * compute_s
        t = self.tenants[name]
        missing = len(t.residency.missing_layers)
        if missing:  # rent: exposure beyond the target share, over a layout's expected life
            excess = max(0.0, exposed_s - self.max_exposed * (compute_s + exposed_s))
            rent = self._rent.get(name, 0.0) * (1 - 1 / REBALANCE_HORIZON)
            self._rent[name] = rent + excess
        else:
            self._rent.pop(name, None)
        if not decode_only or compute_s <= 0 or not missing:
            return
        share = exposed_s / (compute_s + exposed_s)
        ema = self._exposed[name] = (1 - EMA) * self._exposed.get(name, share) + EMA * share
        self._calm[name] = self._calm.get(name, 0) + 1
        if self._calm[name] < 2 * self.hysteresis.hold_steps:
            return  # the last change has not been measured yet
        penalty = self._penalty.get(name, 0)
        if ema > 2 * self.max_exposed and missing <= self.alpha_max(t) and penalty < missing:
            self._penalty[name] = penalty + 1
            self._calm[name] = 0
        elif ema < self.max_exposed / 2 and penalty:
            self._penalty[name] = penalty - 1
            self._calm[name] = 0

    def alpha_max(self, t: Tenant) -> int:
        """Layers this model may stream per pass with at most `max_exposed` of the pass exposed
        (the replayed pass plan), less the measured-exposure penalty; 0 until a decode step was
        measured. A step with prefill hides more, but the decodes after it rule: the layers stay
        missing for them too."""
        step = self._step_s.get((t.name, True))
        if step is None:
            return 0
        alpha = max_alpha(
            t.num_layers, self.prefetch_distance, step, self.layer_copy_s(t), self.max_exposed
        )
        return max(0, alpha - self._penalty.get(t.name, 0))

    def _donor(
        self, t: Tenant, admitting: bool = False, capped: bool = True, stuck: bool = False
    ) -> DonorInfo:
        """What the donor choice needs of t. Its cap: the per-model fraction for a model without
        work (every layer when oversubscribed: an idle model goes fully off the device); for a
        model with work, no more than its passes hide (alpha_max), whether it runs now or waits
        for its turn (its turn would start by restoring more; with cap_waiting off a waiting
        model lends up to the fraction); nothing from a running model for an admission.
        `capped` False: the choice without either cap (what cap_hits compares with).
        `stuck` (nothing runs anywhere and, unless oversubscribed, a whole step found nothing to
        run: see `Arbiter.make_room`): every model with work down to its fraction cap, since no
        page would ever be freed otherwise (it streams what it lent until reversion restores it);
        under `whole_models` any model but the requester (`take`) goes off whole, and comes back
        whole once memory allows."""
        n = t.num_layers
        cap = alpha_cap(n, self.max_remap_fraction if capped else 1.0)
        if self.whole_models:
            cap = n if stuck or not t.state.active else 0
        elif stuck and t.state.active:
            pass
        elif t.state.running and admitting:
            cap = 0
        elif self.oversubscribed and not t.state.active:
            cap = n
        elif (
            self.turn_reload and capped and t.state.active and not t.state.running
            and t.name != self.next_up and t.name not in self._offered
        ):
            # Its turn is not next: it is reloaded ahead of it. A model offered this step that
            # could not run keeps what it got back: it may run leniently when none can run
            # strictly (else models that cannot all fit would take each other's layers forever).
            # Layer 0 goes only with no request running: KV cache held by a model that could
            # not run even by streaming could keep every model from loading.
            cap = n - 1 if t.scheduler.running else n
        elif t.state.running or (t.state.active and self.cap_waiting and capped):
            cap = min(cap, self.alpha_max(t))
        return DonorInfo(
            t.name, t.state.running, t.state.last_run, n, len(t.residency.missing_layers), cap,
            self._popularity(t),
        )

    def _popularity(self, t: Tenant) -> float:
        return decay(
            t.state.popularity, self.step.now - t.state.last_arrival, POPULARITY_HALF_LIFE_S
        )

    def remappable_pages(self, model: str | None = None) -> int:
        """Pages that remapping could still free, every model at its cap (for admission checks
        of `model`'s requests)."""
        if self.loads_on_demand and model is not None:
            # Every other model's slabs could go (idle, it gives them all); its own beyond what
            # it must keep to run (every layer but its fraction cap).
            total = 0
            for t in self.tenants.values():
                slabs = t.num_layers - len(t.residency.missing_layers)
                if t.name == model:
                    slabs -= t.num_layers - alpha_cap(t.num_layers, self.max_remap_fraction)
                total += max(0, slabs) * t.residency.pages_per_layer
            return total
        total = 0
        for t in self.tenants.values():
            cap = alpha_cap(t.num_layers, self.max_remap_fraction)
            total += max(0, cap - len(t.residency.missing_layers)) * t.residency.pages_per_layer
        return total

    def takeable_pages(
        self, admitting: bool = False, stuck: bool = False, idle_only: bool = False
    ) -> int:
        """Pages `take` with the same arguments could free now: each donor's layers down to its
        cap (layer 0 stays unless the cap is the whole model). What the admission watermark
        counts, so that it counts only what an admission can really take."""
        total = 0
        for t in self.tenants.values():
            if idle_only and t.state.active:
                continue
            d = self._donor(t, admitting, stuck=stuck)
            whole = d.alpha_cap >= t.num_layers
            limit = d.alpha_cap if whole else min(d.alpha_cap, t.num_layers - 1)
            total += max(0, limit - d.num_missing) * t.residency.pages_per_layer
        return total

    # ---- remap ----------------------------------------------------------------------------------
    def take(
        self, requester: str, pages: int, exclude: str | None = None, admitting: bool = False,
        stuck: bool = False, idle_only: bool = False,
    ) -> int:
        """Free at least `pages` arena pages by remapping layers (of any model but `exclude`;
        only of models not running when `admitting`, unless `stuck`: see `_donor`); returns the
        pages freed."""
        if stuck and self.whole_models:
            exclude = requester  # it runs with every layer: another model goes off whole
        freed = 0
        while freed < pages:
            donors = [
                self._donor(t, admitting, stuck=stuck)
                for t in self.tenants.values()
                if t.name != exclude and not (idle_only and t.state.active)
            ]
            name = next_donor(donors, self.sharing, self.donor_order)
            uncapped = [
                self._donor(t, admitting, capped=False)
                for t in self.tenants.values() if t.name != exclude
            ]
            self._note_decisions(donors, uncapped, name)
            if name is None:
                break
            t = self.tenants[name]
            whole = next(d for d in donors if d.name == name).alpha_cap >= t.num_layers
            layer = next_to_evict(t.num_layers, t.residency.missing_layers, keep_first=not whole)
            if layer is None:
                break
            freed += self._evict(t, layer)
            if self.whole_models:  # the rest of the model goes with it
                for i in range(t.num_layers):
                    if t.residency.is_resident(i):
                        freed += self._evict(t, i)
        return freed

    def note(self, model: str, counter: str) -> None:
        """Tally a decision taken for `model` in this step (commit adds it to its counter)."""
        self.step.notes[model, counter] += 1

    def _note_decisions(
        self, donors: list[DonorInfo], uncapped: list[DonorInfo], chosen: str | None
    ) -> None:
        """Count what the ablations turn on: a choice MRU and LRU make differently, and a take the
        caps changed (the per-model fraction, and waiting models lending only what they hide: the
        choice without them differs)."""
        other = "lru" if self.donor_order == "mru" else "mru"
        if chosen is not None and next_donor(donors, self.sharing, other) != chosen:
            self.step.notes[chosen, "donor_order_decisive"] += 1
        free_choice = next_donor(uncapped, self.sharing, self.donor_order)
        if free_choice is not None and free_choice != chosen:
            self.step.notes[free_choice, "cap_hits"] += 1

    def _evict(self, t: Tenant, layer: int) -> int:
        pages = t.residency.evict(layer)
        self.step.memory.append(EvictLayer(t.name, layer, tuple(pages)))
        return len(pages)

    def _make_run(self, t: Tenant, pages: int) -> bool:
        """Free a contiguous run of `pages` for t by remapping one layer of another model whose
        slab, with the free pages around it, spans such a run (models not running first, MRU)."""
        arena = self.arena
        donors = (self._donor(x) for x in self.tenants.values() if x.name != t.name)
        order = sorted(
            (d for d in donors if d.num_missing < d.alpha_cap),
            key=lambda d: (d.active, -d.last_run),
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
    def _restore_one(self, t: Tenant, displace: bool = False, layer: int | None = None) -> bool:
        """Restore a layer of t (by default the one that best evens out the rest), freeing idle
        KV pages if needed, then compacting slabs, then (`displace`: t is about to run) remapping
        another model's layer whose slab makes room."""
        missing = t.residency.missing_layers
        if layer is None:
            layer = next_to_restore(t.num_layers, missing)
        if layer is None:
            return False
        ppl = t.residency.pages_per_layer
        pages = t.residency.restore(layer)
        if pages is None:
            # Idle KV pages go back to the arena, cached blocks on them too (see memory/kv.py).
            for other in self.tenants.values():
                other.pool.shrink()
            pages = t.residency.restore(layer)
            if pages is None and self._compact_kv(ppl):  # a few device copies: cheapest first
                pages = t.residency.restore(layer)
            if pages is None and self._compact(ppl):
                pages = t.residency.restore(layer)
            if pages is None and displace and self._make_run(t, ppl):
                pages = t.residency.restore(layer)
            if pages is None:
                self.step.notes[t.name, "restore_failures"] += 1
                return False
        self.step.memory.append(RestoreLayer(t.name, layer, tuple(pages)))
        self._note_copy(t)
        return True

    def _note_copy(self, t: Tenant) -> None:
        """A layer of t goes on the host link: when it should land (the copies before it first)."""
        start = max(self.step.now, self._link_free)
        self._link_free = start + self.copy_s(t)
        self._ready[t.name] = self._link_free

    def turn_quantum(self) -> int:
        """Turn reloads: the steps a turn lasts at least, enough for the slowest decode step of a
        model with work to hide the copy of the largest deficit of a model waiting for its turn
        (0 when none misses a layer, or before a step was measured). Turns of equal steps give
        every request the same share of the device (its TPOT is about one step of each model
        with work), where turns of equal time would slow the requests of the busiest models;
        a faster model's turn is held until the next model's copies land (`reloading`)."""
        deficit = max(
            (
                len(t.residency.missing_layers) * self.copy_s(t)
                for t in self.tenants.values() if t.state.active and not t.state.running
            ),
            default=0.0,
        )
        steps = [
            s for (name, decode), s in self._step_s.items()
            if decode and s > 0 and self.tenants[name].state.active
        ]
        if deficit <= 0 or not steps:
            return 0
        return math.ceil(deficit / max(steps))

    def reloading(self, name: str | None, now: float) -> bool:
        """Layers restored for `name` are still expected on the link at `now`."""
        return name is not None and self._ready.get(name, 0.0) > now

    def prepare(self, t: Tenant) -> None:
        """Before a model with non-resident layers runs: restore layers while streaming would not
        hide under its compute and there is memory to do it; record which way it went; then move
        one misplaced layer if that pays for its copy."""
        self._offered.add(t.name)
        missing = len(t.residency.missing_layers)
        if not missing:
            return
        restored = False
        if self.whole_models:
            restored = self._load_whole(t)
        elif not t.residency.is_resident(0):
            # Fully off the GPU (oversubscribed): nothing to stream through until layer 0 is
            # back, so restore now, whatever the backoff says; what alpha allows may stream.
            self._backoff.pop(t.name, None)
            restored = self._restore_to(t, self.alpha_max(t))
        elif self.revert:
            restored = self._restore_to(t, self.alpha_max(t))
        if t.state.reactivating:
            t.state.reactivating = False
            kind = "reactivations_restored" if restored else "reactivations_streamed"
            self.step.notes[t.name, kind] += 1
        self._rebalance(t)

    def reclaim_due(self, t: Tenant) -> int | None:
        """Rent or buy, for a model about to run with more layers lent than its passes hide while
        other models' KV cache holds the memory (temporal sharing; reversion on; `cap_waiting`:
        what this keeps true when a model lent layers while it had no work): once its passes
        have waited for streamed copies as long as bringing those layers back costs (their copy,
        and the KV cache they displace going to host and back: RECLAIM_COPIES copies a layer),
        it buys. What counts is exposure beyond the target share (`max_exposed`: streaming the
        controller planned to hide), decayed over REBALANCE_HORIZON passes (a rate, not a sum
        over the whole run). Returns the pages to free for them first (the planner has the
        arbiter preempt requests of models out of their turn), None while it still rents. The
        layers come back in the memory step after this one (`after_step`: KV pages may move
        there). Only with most of its passes' time waiting (RECLAIM_EXPOSED): the preempted
        requests' TPOT pays the stall."""
        if (
            not self.revert or not self.cap_waiting or self.sharing != "temporal"
            or self.loads_on_demand or self.whole_models or t.name in self._reclaim
        ):
            return None
        over = len(t.residency.missing_layers) - self.alpha_max(t)
        rent = self._rent.get(t.name, 0.0)
        if over <= 0 or rent <= 0 or rent < RECLAIM_COPIES * over * self.copy_s(t):
            return None
        if self._exposed.get(t.name, 0.0) < RECLAIM_EXPOSED:
            return None
        self._reclaim[t.name] = over
        self._rent[t.name] = 0.0
        self.note(t.name, "reclaims")
        return max(0, over * t.residency.pages_per_layer - self._free_pages())

    def _restore_reclaimed(self) -> None:
        """The layers `reclaim_due` decided to bring back, into the memory freed for them (the
        reversion reserve does not hold them back: they were paid for)."""
        for name, layers in self._reclaim.items():
            t = self.tenants[name]
            for _ in range(layers):
                if not t.residency.missing_layers or not self._restore_one(t):
                    break
        self._reclaim.clear()

    def runnable(self, t: Tenant, strict: bool = True) -> bool:
        """t can run a pass: every layer is resident, or layer 0 is (the missing ones stream
        through borrowed slabs, the first of them layer 0's; not under `whole_models`).
        Oversubscribed and `strict`, no more may be missing than its passes hide (alpha_max):
        a pass that streams more holds the device for every model while it waits for copies,
        so the model rather waits for memory (the planner runs it anyway when nothing else
        can run)."""
        if self.whole_models:
            return not t.residency.missing_layers
        if not t.residency.is_resident(0):
            return False
        if self.loads_on_demand and strict:
            return len(t.residency.missing_layers) <= self.alpha_max(t)
        return True

    def _load_whole(self, t: Tenant) -> bool:
        """Offload baseline: bring every missing layer of t back, emptying idle models whole,
        or none when they cannot all come back now (a half-loaded model could not run and
        would hold memory another model may need)."""
        missing = t.residency.missing_layers
        ppl = t.residency.pages_per_layer
        idle = sum(
            (x.num_layers - len(x.residency.missing_layers)) * x.residency.pages_per_layer
            for x in self.tenants.values() if x.name != t.name and not x.state.active
        )
        if self._free_pages() + idle < len(missing) * ppl:
            return False
        for _ in missing:
            short = ppl - self._free_pages()
            if short > 0 and self.take(t.name, short, exclude=t.name) < short:
                return False
            if not self._restore_one(t, displace=True):
                return False
        return True

    def _restore_to(self, t: Tenant, limit: int) -> bool:
        """Restore until at most `limit` layers are missing; True if any was restored."""
        restored = False
        ppl = t.residency.pages_per_layer
        wait = self._backoff.get(t.name, 0)
        if wait:  # a restore failed lately: stream for a while rather than retry every step
            self._backoff[t.name] = wait - 1
            return False
        while len(t.residency.missing_layers) > limit:
            # Memory for one more layer: free pages beyond the reversion reserve (kept for the
            # KV cache of the running requests, as reversion and prefetches keep it: a restore
            # into it would preempt them later), else the layers of models not running now (the
            # parameter deficit moves to them: one copy now instead of one every pass).
            short = revert_shortfall(
                self._free_pages(), ppl, self._kv_in_use(), self.revert_reserve
            )
            if short > 0 and self.take(t.name, short, exclude=t.name) < short:
                self._backoff[t.name] = self.hysteresis.hold_steps
                break
            if not self._restore_one(t, displace=True):
                self._backoff[t.name] = self.hysteresis.hold_steps
                break
            restored = True
        return restored

    def _rebalance(self, t: Tenant) -> None:
        step = self._step_s.get((t.name, True))
        missing = t.residency.missing_layers
        if step is None or not missing:
            return
        move = rebalance(
            t.num_layers, missing, self.prefetch_distance, step, self.layer_copy_s(t),
            REBALANCE_HORIZON,
        )
        if move is None:
            return
        out, into = move
        self._evict(t, into)  # its pages make room for the layer coming back
        if not self._restore_one(t, layer=out):
            return
        self.step.notes[t.name, "rebalances"] += 1

    def prefetch(self, t: Tenant) -> int:
        """`t` runs next: restore its missing layers into free memory, keeping the reversion
        reserve free for the KV cache of the model running now (oversubscribed: also into layers
        that models not running give, see `take`). Returns the layers restored."""
        if not self.revert or self.whole_models:
            return 0
        restored = 0
        ppl = t.residency.pages_per_layer
        while t.residency.missing_layers:
            if not should_revert(self._free_pages(), ppl, self._kv_in_use(), self.revert_reserve):
                # Oversubscribed, the next model's layers also come from idle models (whole,
                # the coldest first), and with turn reloads from models whose turn comes later:
                # its turn would otherwise start with the copies exposed.
                if not self.loads_on_demand or self.take(
                    t.name, ppl, exclude=t.name, admitting=True, idle_only=not self.turn_reload
                ) < ppl:
                    break
            if not self._restore_one(t):
                break
            restored += 1
        self.step.notes[t.name, "prefetched_layers"] += restored
        return restored

    def prefetch_lead_steps(self, t: Tenant, running: str) -> int:
        """Steps of the running model it takes to copy t's missing layers (at least one)."""
        step = self._step_s.get((running, True)) or self._step_s.get((running, False))
        copies = len(t.residency.missing_layers) * self.copy_s(t)
        return 1 + (int(copies / step) if step else 0)

    def restore_all(self, next_to_run: list[str]) -> int:
        """Restore layers, the model most likely to run next first, until none is missing or
        memory runs out (the engine is idle)."""
        restored = 0
        if self.whole_models:
            return 0
        donors = [self._donor(t) for t in self.tenants.values()]
        for name in restore_priority(donors, next_to_run):
            t = self.tenants[name]
            while t.residency.missing_layers and self._free_pages() >= t.residency.pages_per_layer:
                if not self._restore_one(t):
                    break
                restored += 1
        return restored

    def after_step(self, next_to_run: list[str], step_s: float) -> None:
        """Dynamic reversion: after free KV memory held for the hysteresis, restore as many layers
        as keep the reserve free, at most as many as one pass of `step_s` hides on the link.
        First the layers a model reclaimed in the step (`reclaim_due`)."""
        if not self.revert or self.whole_models:
            return
        self._restore_reclaimed()
        if any(t.scheduler.short_of_memory for t in self.tenants.values()):
            self.hysteresis.streak = 0  # a request waits for KV cache: demand has not fallen
            return
        donors = [self._donor(t) for t in self.tenants.values()]
        if self.oversubscribed:  # layers of a model without work would only go again
            donors = [d for d in donors if self.tenants[d.name].state.active]
        order = restore_priority(donors, next_to_run)
        if not order:
            self.hysteresis.streak = 0
            return
        t = self.tenants[order[0]]
        ppl = t.residency.pages_per_layer
        ok = should_revert(self._free_pages(), ppl, self._kv_in_use(), self.revert_reserve)
        if not self.hysteresis.update(ok):
            return
        copy_s = self.copy_s(t)
        budget = max(1, int(step_s / copy_s)) if copy_s > 0 else t.num_layers
        for name in order:
            t = self.tenants[name]
            while budget and t.residency.missing_layers and should_revert(
                self._free_pages(), t.residency.pages_per_layer, self._kv_in_use(),
                self.revert_reserve,
            ):
                if not self._restore_one(t):
                    budget = 0
                    break
                budget -= 1
        self.hysteresis.streak = 0  # a new hold period before the next batch of restores

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
            self._note_copy(t)
        return True

    def _compact_kv(self, pages: int) -> bool:
        """Enough pages are free but KV pages split them: move the KV pages out of the window of
        `pages` that holds the fewest (device-to-device page copies, far cheaper than re-copying
        slabs from the host); block tables and the prefix cache follow. Only while the step
        plans no KV swap (`kv_moves_ok`)."""
        if not self.kv_moves_ok:
            return False
        moves = self.arena.plan_kv_moves(pages)
        if not moves:
            return False
        by_model: dict[str, list[tuple[int, int]]] = {}
        for owner, src, dst in moves:
            by_model.setdefault(owner.model, []).append((src, dst))
        for name, pairs in by_model.items():
            t = self.tenants[name]
            t.scheduler.renumber_blocks(t.pool.move_pages(pairs))
            self.step.memory.append(
                MoveKV(name, tuple(s for s, _ in pairs), tuple(d for _, d in pairs))
            )
        return True

    # ---- helpers --------------------------------------------------------------------------------
    def _free_pages(self) -> int:
        """Free arena pages plus KV pages without a live block (shrinkable at once)."""
        return self.arena.num_free + sum(t.pool.num_idle_pages for t in self.tenants.values())

    def _kv_in_use(self) -> int:
        return sum(x.pool.num_busy_pages for x in self.tenants.values())
