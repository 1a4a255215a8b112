"""Planning a step, torch-free: which models run (tenancy), what each runs (its scheduler), and every
memory decision on the way (the arbiter, the remapping controller), returned as one `Step` of data.

    refresh the metadata store from the schedulers and the accounting
    for each model in tenancy order:   prepare its layers (remap controller) -> schedule (scheduler,
                                       asking the arbiter for room)
                                       (a model runs only when the controller finds it runnable:
                                       layer 0 resident and, oversubscribed, no more layers missing
                                       than its passes hide; if none is, those with layer 0,
                                       models with requests running first; one that waited
                                       max_wait_s so runs streaming, whatever else runs)
                                       (turn reloads: a turn lasts the steps that hide a reload
                                       and holds while the next model's copies are on the link)
    fold preemptions made for another model into that model's plan; note each plan's streamed
    layers; collect the KV pools' resizes
After the step ran, `observe` folds measured step times into the controller and plans dynamic
reversion (a step of memory actions only), as does `revert_idle` when no request is left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oneiros.core import Step, StepPlan, StepResult

if TYPE_CHECKING:
    from oneiros.engine.arbiter import Arbiter
    from oneiros.engine.remapping import RemapController
    from oneiros.engine.tenancy import MetadataStore, TenancyPolicy
    from oneiros.engine.tenant import Tenant


class Planner:
    def __init__(
        self,
        tenants: dict[str, Tenant],
        store: MetadataStore,
        tenancy: TenancyPolicy,
        arbiter: Arbiter,
        remap: RemapController | None,
    ) -> None:
        self.tenants = tenants
        self.store = store
        self.tenancy = tenancy
        self.arbiter = arbiter
        self.remap = remap
        # Models that could run only by streaming more than their passes hide: since when.
        self._blocked_since: dict[str, float] = {}
        self._stalled = False  # the last step planned nothing, requests waited, none ran

    def plan(self, now: float) -> Step:
        step = Step(now)
        self.refresh()
        self.arbiter.begin(now)
        self.arbiter.stalled = self._stalled
        if self.remap is not None:
            self.remap.begin(step)
        hold = False
        if self.remap is not None and self.remap.turn_reload:
            hold = self.remap.reloading(self.tenancy.next_up(self.store, now), now)
            self.tenancy.turn_min_steps = self.remap.turn_quantum()
        queue = self.tenancy.order(self.store, now, hold, self._streams(self.tenancy.turn))
        for name in [n for n in self._blocked_since if n not in queue]:
            del self._blocked_since[name]  # no work left: its wait is over
        fallback: list[str] = []  # could run, but only by streaming more than its passes hide
        lenient = False
        while True:
            if not queue:  # nothing could run otherwise: those run anyway (streaming), the
                # ones with requests running first (they make progress without new KV cache)
                if step.plans or lenient or not fallback:
                    break
                queue = sorted(fallback, key=lambda n: not self.tenants[n].scheduler.running)
                lenient = True
            name = queue.pop(0)
            t = self.tenants[name]
            self.tenancy.ran(self.store, name, now)
            self._set_running(name)
            if self.remap is not None:
                self.remap.next_up = self.tenancy.next_up(self.store, now)
                if not lenient:
                    need = self.remap.reclaim_due(t)
                    if need:
                        self.arbiter.preempt_others(name, need)
                    self.remap.prepare(t)
                if self.remap.runnable(t, strict=not lenient):
                    self._blocked_since.pop(name, None)
                else:
                    streams = not lenient and self.remap.runnable(t, strict=False)
                    if not (streams and self._waited_max(name, now)):
                        t.state.running = False  # off the device, no room to bring it back yet
                        if streams:
                            fallback.append(name)
                        continue
            plan = t.scheduler.schedule()
            if self.remap is not None and self._swaps_planned(plan):
                self.remap.kv_moves_ok = False  # KV pages stay put for the rest of the step
            self.arbiter.planned_model(name)
            if not plan.empty:
                step.plans.append(plan)
                if not self.tenancy.spatial:
                    break  # temporal: one model per step, the first with something to run
            elif plan.preempted:
                step.idle.append(plan)
        self._merge_foreign(step)
        if self.remap is not None and not self.tenancy.spatial and step.plans:
            self._prefetch(step.plans[-1].model, now)
        for plan in step.plans:
            plan.stream = tuple(self.tenants[plan.model].residency.missing_layers)
        self._collect_resizes(step)
        for t in self.tenants.values():  # last: planning that raises before here loses none
            step.finished += t.scheduler.finished_in_schedule
            t.scheduler.finished_in_schedule.clear()
        self._stalled = not step.plans and not self.arbiter.running_anywhere() and any(
            t.scheduler.waiting for t in self.tenants.values()
        )
        return step

    def _swaps_planned(self, plan: StepPlan) -> bool:
        """This plan, or a preemption made for it in another model, copies KV blocks."""
        return bool(
            plan.swap_out or plan.swap_in
            or any(f.swap_out for f in self.arbiter.foreign.values())
        )

    def _streams(self, name: str | None) -> bool:
        """`name` has lent layers that its passes stream (copied in, not restored)."""
        return name in self.tenants and bool(self.tenants[name].residency.missing_layers)

    def _waited_max(self, name: str, now: float) -> bool:
        """`name` could run only by streaming more than its passes hide, and has waited for memory
        to bring its layers back for `max_wait_s`: it runs so (its copies exposed) rather than wait
        on: the memory may be held by the KV cache of a model that keeps running meanwhile."""
        since = self._blocked_since.setdefault(name, now)
        return now - since >= self.tenancy.max_wait_s

    def _set_running(self, name: str) -> None:
        """`name` is offered this step. Temporal: it alone runs (holds the turn); spatial: every
        model with work runs. A model that starts running with layers missing is reactivating:
        the controller decides whether it restores or streams them."""
        t = self.tenants[name]
        if not self.tenancy.spatial:
            for other in self.tenants.values():
                other.state.running = False
        if not t.state.running and t.residency.missing_layers:
            t.state.reactivating = True
        t.state.running = True

    def _prefetch(self, running: str, now: float) -> None:
        """Temporal: when the turn ends within the time it takes to copy the next model's missing
        layers (one step at least), they start coming back now, overlapped with this turn."""
        assert self.remap is not None
        nxt = self.tenancy.next_up(self.store, now)
        if nxt is None or nxt == running or not self.tenants[nxt].residency.missing_layers:
            return
        left = self.tenancy.steps_left(self.store, self._streams(running))
        if left <= self.remap.prefetch_lead_steps(self.tenants[nxt], running):
            self.remap.prefetch(self.tenants[nxt])

    def observe(self, step: Step, results: list[StepResult]) -> Step | None:
        """After `step` ran: measured compute times feed the controller's alpha; dynamic reversion
        may restore layers (returned as a step of memory actions, None when there is none)."""
        if self.remap is None:
            return None
        step_s = 0.0
        for plan, result in zip(step.plans, results):
            if plan.seqs:
                if result.timed:  # else its waits hide in elapsed: no measurement of either
                    self.remap.observe_step(
                        plan.model, result.elapsed - result.exposed_s,
                        plan.num_prefill_tokens == 0, result.exposed_s,
                    )
                step_s = max(step_s, result.elapsed - result.exposed_s)
        self.refresh()
        after = Step(step.now)
        self.remap.begin(after)
        self.remap.after_step(self.tenancy.order(self.store, step.now), step_s)
        self._collect_resizes(after)
        return after if after.memory or after.notes else None

    def revert_idle(self, now: float) -> Step | None:
        """No request anywhere: restore every remapped layer memory allows, the model most
        likely to run next first (no hysteresis: there is no demand to wait out)."""
        if self.remap is None or not self.remap.revert:
            return None
        self.refresh()
        step = Step(now)
        self.remap.begin(step)
        self.remap.restore_all(self.tenancy.order(self.store, now))
        self._collect_resizes(step)
        return step

    def refresh(self) -> None:
        """The metadata store's view of each model: whether it has work. A model without work
        does not run."""
        for t in self.tenants.values():
            if self.tenancy.fresh_first:  # read by the tenancy order only then
                t.state.first_waiting = min(
                    (r.arrival_time for r in t.scheduler.waiting if not r.output_token_ids),
                    default=None,
                )
            t.state.active = t.scheduler.has_work
            if not t.state.active:
                t.state.running = False

    def _merge_foreign(self, step: Step) -> None:
        """Fold preemptions made for another model into the victim model's plan of this step (its
        swap-outs first), or add a plan of their own: executed when it swaps out (copies only),
        else kept as idle (commit and trace only)."""
        for name, f in self.arbiter.take_foreign().items():
            own = next((p for p in step.plans + step.idle if p.model == name), None)
            if own is not None:
                own.preempted[:0] = f.preempted
                own.swap_out[:0] = f.swap_out
                own.recomputed_tokens += f.recomputed_tokens
                if own.swap_out and any(p is own for p in step.idle):
                    step.idle = [p for p in step.idle if p is not own]
                    step.plans.insert(0, own)
            elif f.swap_out:
                step.plans.insert(0, f)
            else:
                step.idle.append(f)

    def _collect_resizes(self, step: Step) -> None:
        for t in self.tenants.values():
            step.memory += t.pool.drain_resizes()
