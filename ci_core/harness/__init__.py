"""The benchmark harness behind ``ci-bench run`` and ``ci-bench report``.

``plan`` turns sweep settings into model, scan and repair cells keyed by the
hash of what determines them; ``store`` files finished cells atomically under those
keys; ``cells`` runs one cell; ``executors`` run many (in-process or on Ray);
``sweep`` ties them together; ``metrics`` and ``report`` compute and write the
tables and figures.
"""

from ci_core.harness.executors import CellOptions, LocalExecutor, RayExecutor
from ci_core.harness.plan import ModelCell, Plan, RepairCell, ScanCell, SweepSettings, plan_sweep
from ci_core.harness.report import build_report, write_report
from ci_core.harness.store import Store
from ci_core.harness.sweep import SweepSummary, run_sweep

__all__ = [
    "CellOptions", "LocalExecutor", "ModelCell", "Plan", "RayExecutor", "RepairCell", "ScanCell", "Store",
    "SweepSettings", "SweepSummary", "build_report", "plan_sweep", "run_sweep", "write_report",
]
