"""The benchmark harness behind ``ci-bench run`` and ``ci-bench report``.

``records`` defines each cell's typed spec (what determines its result, hashed
into its key) and the record it files; ``plan`` turns sweep settings into model,
reference, scan and repair cells; ``store`` files finished cells atomically
under their keys; ``cells`` runs one cell; ``executors`` run many (in-process or
on Ray); ``sweep`` ties them together; ``statistics`` and the ``report`` package
compute and write the tables and figures.
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
