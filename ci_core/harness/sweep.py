"""A sweep: plan the cells, skip those already in the store, run the rest with an executor."""

from __future__ import annotations

from typing import Callable

import attrs

from ci_core.harness.executors import CellOptions, SweepStatus
from ci_core.harness.plan import Plan
from ci_core.harness.store import Store


@attrs.frozen(kw_only=True)
class SweepSummary:
    planned: int
    reused: int  # already in the store before this run
    done: int  # finished by this run
    failed: tuple[dict, ...]  # outcomes of the cells that failed in this run
    declined: tuple[dict, ...] = ()  # outcomes of the cells that had nothing to do (``NotApplicable``)
    discarded: tuple[str, ...]  # half-written cells of an interrupted run, deleted and redone


def run_sweep(store: Store, plan: Plan, executor, options: CellOptions, emit: Callable[[str], None]) -> SweepSummary:
    """Run every cell of ``plan`` that the store does not hold yet; ``executor`` must be entered."""
    with store.lock():
        discarded = store.discard_unfinished()
        if discarded:
            emit(f"deleted {len(discarded)} half-written cell(s) left by an interrupted run: {', '.join(discarded)}")
        store.record_plan(plan.describe())
        cells = plan.cells()
        stale: set[str] = set()
        for cell in cells:  # in plan order: a cell's upstream cells come before it
            if store.is_declined(cell.key) and any(key in stale for key in cell.depends_on):
                store.forget_declined(cell.key)  # its reason came from results being recomputed
            if not store.is_done(cell.kind, cell.key):
                continue
            problem = store.verify(cell.kind, cell.key)
            upstream = [key for key in cell.depends_on if key in stale]
            if problem is None and not upstream:
                continue
            moved = store.set_aside(cell.kind, cell.key)
            why = problem or f"its upstream cell {upstream[0]} is being recomputed"
            emit(f"{cell.kind} cell {cell.label}: {why}; moved to {moved.relative_to(store.root)}, computing it again")
            stale.add(cell.key)
        declined_before = {c.key for c in cells if store.is_declined(c.key)}
        todo = [c for c in cells if not store.is_done(c.kind, c.key) and c.key not in declined_before]
        reused = len(cells) - len(todo) - len(declined_before)
        settled = f" ({len(declined_before)} of them with nothing to do)" if declined_before else ""
        emit(f"{len(cells)} cells ({plan.counts()}): {len(cells) - len(todo)} already in {store.root}{settled}, "
             f"{len(todo)} to run with the {executor.name} executor")
        for skipped in plan.skipped_repairs:
            emit(f"no repair cells for {skipped.attack} ({', '.join(skipped.repairers)}): {skipped.reason}")
        status = SweepStatus(todo, already_done=reused, parallel=executor.slots(), emit=emit,
                             running=executor.running_probe(store))
        outcomes = executor.run(store, todo, options, status) if todo else []
    failed = tuple(o for o in outcomes if o["status"] == "failed")
    declined = tuple(o for o in outcomes if o["status"] == "declined")
    return SweepSummary(planned=len(cells), reused=reused, done=len(outcomes) - len(failed) - len(declined),
                        failed=failed, declined=declined, discarded=tuple(discarded))
