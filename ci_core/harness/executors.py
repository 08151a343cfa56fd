"""Executors: run a sweep's unfinished cells in-process (``local``) or as Ray tasks (``ray``).

Both call ``cells.execute`` on the same plain-JSON cells and write into the same
store, so they give the same results for the same seeds.  A cell waits for the
cells it depends on (a scan for its model, a repair for its model and scan); a
failed one fails its dependants without running them.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import attrs

from ci_core.harness.cells import execute
from ci_core.harness.plan import Cell
from ci_core.harness.store import KINDS, Store
from ci_core.errors import ConfigError

RAY_EXTRA = "pip install 'clip-inspector[ray]'"
RAY_OBJECT_STORE_BYTES = 128 * 1024**2  # outcomes are small dicts; results go to the store on disk
HEARTBEAT_SECONDS = 60


@attrs.frozen(kw_only=True)
class CellOptions:
    device: str = "auto"
    threads: int | None = None  # torch threads inside a cell (None: leave the process's setting)
    verbose: bool = False  # print each cell's own progress lines


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class SweepStatus:
    """Counts done / declined / running / failed cells and estimates the time left from the cells finished so far."""

    def __init__(self, cells: Sequence[Cell], *, already_done: int, parallel: int, emit: Callable[[str], None],
                 running: Callable[[], int] | None = None):
        self.total = len(cells) + already_done
        self.done, self.failed, self.declined = already_done, 0, 0
        self.left = {kind: sum(c.kind == kind for c in cells) for kind in KINDS}
        self.seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
        self.parallel = max(1, parallel)
        self.emit = emit
        # Executors that report starts are counted here; others (Ray) pass a probe of the store.
        self.in_flight = 0
        self.running = running or (lambda: self.in_flight)
        self.failures: list[dict] = []

    def eta(self) -> float | None:
        finished = [s for per_kind in self.seconds.values() for s in per_kind]
        if not finished:
            return None
        overall = sum(finished) / len(finished)
        mean = {kind: (sum(s) / len(s) if s else overall) for kind, s in self.seconds.items()}
        return sum(self.left[kind] * mean[kind] for kind in self.left) / self.parallel

    def line(self, note: str = "") -> str:
        eta = self.eta()
        left = "time left unknown" if eta is None else f"about {_duration(eta)} left"
        declined = f" ({self.declined} of them with nothing to do)" if self.declined else ""
        text = (f"cells: {self.done + self.declined}/{self.total} done{declined}, {self.running()} running, "
                f"{self.failed} failed; {left}")
        return f"{text} | {note}" if note else text

    def started(self, cell: Cell) -> None:
        self.in_flight += 1
        self.emit(self.line(f"starting {cell.kind} {cell.label}"))

    def finished(self, outcome: dict) -> None:
        self.left[outcome["kind"]] -= 1
        self.in_flight = max(0, self.in_flight - 1)
        if outcome.get("seconds") is not None:  # None: the task died before it could time itself
            self.seconds[outcome["kind"]].append(outcome["seconds"])
        if outcome["status"] == "done":
            self.done += 1
            note = f"finished {outcome['kind']} {outcome['label']} in {outcome['seconds']:.0f}s"
        elif outcome["status"] == "declined":
            self.declined += 1
            note = f"nothing to do for {outcome['kind']} {outcome['label']}: {outcome['reason']}"
        else:
            self.failed += 1
            self.failures.append(outcome)
            note = f"FAILED {outcome['kind']} {outcome['label']}: {outcome['error']}"
        self.emit(self.line(note))


class LocalExecutor:
    """Cells one after another in this process."""

    name = "local"

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def slots(self) -> int:
        return 1

    def running_probe(self, store: Store) -> None:
        return None  # the status counts the cells this executor starts

    def run(self, store: Store, cells: Sequence[Cell], options: CellOptions, status: SweepStatus) -> list[dict]:
        outcomes: dict[str, dict] = {}
        for cell in cells:
            status.started(cell)
            upstream = [outcomes[key] for key in cell.depends_on if key in outcomes]  # absent: already in the store
            outcome = execute(str(store.root), cell.to_json(), *upstream, device=options.device,
                              threads=options.threads, verbose=options.verbose)
            outcomes[cell.key] = outcome
            status.finished(outcome)
        return list(outcomes.values())


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed; install the extra: {RAY_EXTRA}") from None
    return ray


class RayExecutor:
    """Cells as Ray tasks on an existing cluster (``address``) or on a local one started here.

    Each task takes ``cpus_per_cell`` CPUs, and one GPU when the cluster has GPUs.
    The store must be on a file system every node sees.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, local_cpus: int = 1, cpus_per_cell: int = 1):
        if local_cpus < 1 or cpus_per_cell < 1:
            raise ConfigError(f"Ray needs at least one CPU per cell and in the local cluster, "
                              f"got {cpus_per_cell} and {local_cpus}")
        self.ray = import_ray()
        self.address, self.local_cpus, self.cpus_per_cell = address, local_cpus, cpus_per_cell
        self._started = False

    def __enter__(self) -> "RayExecutor":
        ray = self.ray
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=True, configure_logging=False)
            else:
                ray.init(num_cpus=self.local_cpus, include_dashboard=False, log_to_driver=True,
                         object_store_memory=RAY_OBJECT_STORE_BYTES, configure_logging=False)
            self._started = True
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False

    def _gpus(self) -> int:
        return int(self.ray.cluster_resources().get("GPU", 0))

    def slots(self) -> int:
        gpus = self._gpus()
        if gpus:
            return gpus
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)) // self.cpus_per_cell)

    def running_probe(self, store: Store) -> Callable[[], int]:
        return store.running  # tasks start out of sight: count the cells being written

    def run(self, store: Store, cells: Sequence[Cell], options: CellOptions, status: SweepStatus) -> list[dict]:
        ray = self.ray
        gpus = self._gpus() if options.device != "cpu" else 0
        task = ray.remote(num_cpus=self.cpus_per_cell, num_gpus=1 if gpus else 0)(execute)
        device = options.device if options.device != "auto" else ("cuda" if gpus else "cpu")
        threads = options.threads or self.cpus_per_cell
        refs, pending = {}, {}
        for cell in cells:
            # Refs passed as arguments of their own: Ray runs the cell after them and hands it their outcomes.
            upstream = [refs[key] for key in cell.depends_on if key in refs]
            ref = task.remote(str(store.root), cell.to_json(), *upstream, device=device, threads=threads,
                              verbose=options.verbose)
            refs[cell.key] = ref
            pending[ref] = cell
        status.emit(status.line(f"submitted {len(cells)} cells to Ray ({self.slots()} at a time)"))
        outcomes, last = [], time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the task died (worker lost, dependency lost)
                    error = f"Ray task failed: {type(exc).__name__}: {exc}"
                    store.record_failure({"key": cell.key, "kind": cell.kind, "label": cell.label, "spec": cell.spec.to_json(),
                                          "error": error})
                    outcome = {"key": cell.key, "kind": cell.kind, "label": cell.label, "status": "failed",
                               "error": error, "seconds": None}
                outcomes.append(outcome)
                status.finished(outcome)
                last = time.monotonic()
            if not ready and time.monotonic() - last > HEARTBEAT_SECONDS:
                status.emit(status.line())
                last = time.monotonic()
        return outcomes
