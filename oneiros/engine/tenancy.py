"""Which models run in a step, and the per-model state the remapping controller reads.

Temporal sharing runs one model per step, in turns: the model whose turn it is runs for `turn_steps`
steps (or until it has nothing to run, or for at most `turn_max_s` unless it streams lent layers
in its passes), then the turn passes to the next model with work in round-robin order, except
that a model which has not been offered a step for `max_wait_s` goes first. Models out of their
turn are not running: they are the first to give parameter memory (the one that ran most recently
is needed last), and the next one gets its layers back before its turn.
With turn reloads (see `engine/remapping.py`) a turn lasts at least the steps that hide a reload
and until the next model's layers have landed, and a model whose oldest request has waited
`max_wait_s` for its first token goes before the others.
Spatial sharing runs every model with work in the same step.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from oneiros.memory.remap import decay

POPULARITY_HALF_LIFE_S = 60.0  # a model's arrival count halves every minute without requests


@dataclass(slots=True)
class TenantCounters:
    """Cumulative per-model counters (they feed /metrics and the benchmarks)."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    # Automatic prefix caching, in tokens as vLLM counts them: the tokens of requests admitted with
    # nothing computed, new or preempted by recompute (queries), and how many of them were found
    # in the cache (hits: their prefill was skipped).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Parameter remapping.
    remapped_layers: int = 0  # layer slabs turned into free pages for KV cache (remap events)
    restored_layers: int = 0  # layers copied back into a slab of their own (revert events)
    restore_failures: int = 0  # no contiguous run of pages for a slab, even after compaction
    compaction_moves: int = 0  # resident slabs moved (re-copied from host) to join free pages
    kv_pages_moved: int = 0  # KV pages copied on the device to join free pages for a slab
    h2d_bytes: int = 0  # host-to-device bytes: streamed layers and restores
    stream_copy_s: float = 0.0  # time spent copying streamed layers
    stream_exposed_s: float = 0.0  # part of it the compute waited for (all of it on CPU)
    reactivations_streamed: int = 0  # came back to work and streamed its missing layers
    reactivations_restored: int = 0  # came back to work and had layers restored first
    prefetched_layers: int = 0  # restored ahead of its turn, overlapped with another model's
    rebalances: int = 0  # a misplaced missing layer moved into the even layout (it paid its copy)
    donor_order_decisive: int = 0  # layers given where MRU and LRU would have chosen differently
    cap_hits: int = 0  # takes where the per-model cap kept a model from giving another layer
    admit_remaps: int = 0  # admissions given layers after waiting admit_remap_after_s
    reclaims: int = 0  # lent layers bought back once streaming them cost as much (rent or buy)


@dataclass(slots=True)
class TenantState:
    """The metadata store's entry for one model."""

    name: str
    last_run: float = 0.0  # engine-clock time of the last step it ran in (0: never)
    last_offer: float = 0.0  # last time the tenancy policy offered it a step
    active: bool = False  # has running or waiting requests
    running: bool = False  # runs in this step (temporal: holds the turn; spatial: has work)
    reactivating: bool = False  # became active with layers missing; cleared once decided
    first_waiting: float | None = None  # arrival of its oldest request without a token yet
    popularity: float = 0.0  # arrivals, decayed with POPULARITY_HALF_LIFE_S (as of last_arrival)
    last_arrival: float = 0.0
    counters: TenantCounters = field(default_factory=TenantCounters)


class MetadataStore:
    """Per-model state plus the arena's page owners over time."""

    def __init__(self, names: list[str], history: int = 100_000) -> None:
        self.states = {n: TenantState(n) for n in names}
        self.page_history: deque[tuple[float, dict[str, int]]] = deque(maxlen=history)

    def note_arrival(self, name: str, now: float) -> None:
        """A request for `name` arrived: its popularity (the donor rule's heat) goes up by one."""
        st = self.states[name]
        st.popularity = decay(st.popularity, now - st.last_arrival, POPULARITY_HALF_LIFE_S) + 1.0
        st.last_arrival = now

    def mru_order(self) -> list[str]:
        """Models by how recently they ran, most recent first."""
        return sorted(self.states, key=lambda n: -self.states[n].last_run)


class TenancyPolicy:
    def __init__(
        self, sharing: str, max_wait_s: float = 1.0, turn_steps: int = 1,
        turn_max_s: float | None = None,
    ) -> None:
        if sharing not in ("temporal", "spatial"):
            raise ValueError(f"sharing must be temporal or spatial, not {sharing!r}")
        if turn_steps < 1:
            raise ValueError(f"turn_steps must be at least 1, got {turn_steps}")
        if turn_max_s is not None and turn_max_s <= 0:
            raise ValueError(f"turn_max_s must be positive, got {turn_max_s}")
        self.sharing = sharing
        self.max_wait_s = max_wait_s
        self.turn_steps = turn_steps
        # A turn also ends before a step that would take it past this long at its pace (None:
        # steps only), so the models waiting for theirs wait no longer however long its steps are.
        self.turn_max_s = turn_max_s
        self.turn: str | None = None  # temporal: the model whose turn it is
        self.turn_used = 0  # steps offered to it in this turn
        self.turn_began = 0.0  # when its first step was offered
        # Turn reloads: a turn lasts at least this many steps (long enough to copy the next model
        # in while it runs), starving models or not.
        self.turn_min_steps = 0
        # ... and then a model whose oldest request without a token has waited max_wait_s goes
        # next, oldest first (with turns that long, a new request could otherwise wait a whole
        # cycle of them for its first token while models offered less recently go first).
        self.fresh_first = False
        self._next = 0  # round-robin position

    @property
    def spatial(self) -> bool:
        return self.sharing == "spatial"

    def order(
        self, store: MetadataStore, now: float, hold: bool = False, streams: bool = False
    ) -> list[str]:
        """Active models in the order they should be offered this step. Spatial sharing runs all of
        them; temporal sharing runs the first one that has something to run (see `ran`): the turn
        holder while its turn lasts and no other model starves, else the next in rotation. `hold`:
        the next model's layers are still on their way, so the holder's turn goes on (starved
        models included: the next one could not run before its copies land anyway). `streams`:
        the holder runs with lent layers it streams in every pass; its turn is not cut by
        turn_max_s (a shorter turn would pay those copies again for fewer tokens)."""
        names = list(store.states)
        rotated = names[self._next :] + names[: self._next]
        active = [n for n in rotated if store.states[n].active]
        starved = [n for n in active if now - store.states[n].last_offer > self.max_wait_s]
        starved.sort(key=lambda n: store.states[n].last_offer)
        order = starved + [n for n in active if n not in starved]
        if self.fresh_first:  # a request kept from its first token goes before all of those
            fresh = sorted(
                (n for n in active if store.states[n].first_waiting is not None
                 and now - store.states[n].first_waiting >= self.max_wait_s),
                key=lambda n: store.states[n].first_waiting,
            )
            order = fresh + [n for n in order if n not in fresh]
        holder = self.turn
        if (
            not self.spatial and holder in active and (
                hold or self.turn_used < self.turn_min_steps
                or (self.turn_used < self.turn_steps
                    and (streams or not self._timed_out(now))
                    and not any(n != holder for n in starved))
            )
        ):
            order = [holder] + [n for n in order if n != holder]
        return order

    def ran(self, store: MetadataStore, name: str, now: float) -> None:
        """`name` was offered a step at `now`: its turn goes on (or begins); the round-robin moves
        past it."""
        store.states[name].last_offer = now
        if name == self.turn:
            self.turn_used += 1
        else:
            self.turn, self.turn_used, self.turn_began = name, 1, now
        names = list(store.states)
        self._next = (names.index(name) + 1) % len(names)

    def _timed_out(self, now: float) -> bool:
        """The holder's next step, at the pace of its turn so far, would end the turn past
        turn_max_s (a turn has at least one step)."""
        if self.turn_max_s is None or self.turn_used < 1:
            return False
        elapsed = now - self.turn_began
        return elapsed + elapsed / self.turn_used > self.turn_max_s

    def steps_left(self, store: MetadataStore, streams: bool = False) -> int:
        """Steps left in the current turn after the one just offered (temporal); with a time
        limit (unless the holder `streams`, see `order`), at the mean pace of its steps so far."""
        left = max(0, self.turn_steps - self.turn_used)
        if self.turn_max_s is None or streams or self.turn_used < 2:
            return left
        elapsed = store.states[self.turn].last_offer - self.turn_began
        if elapsed <= 0:
            return left
        pace = elapsed / (self.turn_used - 1)
        # the k-th step from now runs from elapsed + k * pace for one pace, inside the limit
        return min(left, max(0, math.floor((self.turn_max_s - elapsed) / pace + 1e-9) - 1))

    def next_up(self, store: MetadataStore, now: float | None = None) -> str | None:
        """The model whose turn comes after the current one: the next with work in rotation, or
        (given `now`) the one starved longest."""
        if now is not None:
            return next((n for n in self.order(store, now) if n != self.turn), None)
        names = list(store.states)
        rotated = names[self._next :] + names[: self._next]
        return next((n for n in rotated if n != self.turn and store.states[n].active), None)
