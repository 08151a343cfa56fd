"""``ci-bench report``: the paper's tables and figures from the finished cells of a store.

Every scan's stored per-class evidence is scored again here, with each scorer
of its detector: the calibrated ``ref-outlier`` (against the scan's reference
cell) and the detector's own (the paper's), with their default configs or those
given by ``--scorer-option``.  A scan the model made unscannable (non-finite
outputs, collapsed class scores on the pool) counts as a detection for every
scorer.  Scans are grouped by detector setting and scorer (detector, its
config, pool, scorer, its config): one group per (detector, scorer) in a plain
sweep, more per ablation value.  For each group: the verdict an auditor gets
(AUROC over all models and over those whose backdoor implanted, the
false-positive rate on clean models with its Clopper-Pearson interval, TPR and
target accuracy on implanted ones); model-level detection (AUROC of s_max with the ROC curve, accuracy
and TPR/FPR at the scorer's own threshold k, the Youden-J threshold; Figure 4),
class-level TP/FP/FN/F1 per dataset and per attack (Tables 2-3), the anomaly
score per attack (Figure 5), the reconstructed triggers' ASR on the backdoor
class and on the others (Tables 4, 15-17) and their SSIM (Table 24), and the
wall time.  Per attack: ACC and ASR on seen (base) and unseen (new) classes
(Tables 7-10).  Per repairer, attack and dataset: ACC and ASR before and after
the repair (Tables 19-23).  Definitions are in ``ci_core.harness.statistics`` and in
the report.

The package splits that by job: ``scored`` reads the store and scores every
scan (one ``ScoredScan`` per scan and scorer), ``tables`` computes every table as
plain JSON, ``markdown``, ``html`` (report.html, generic over the tables) and
``figures`` render them, and ``write_report`` here writes the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ci_core.files import publishing
from ci_core.harness.report.combined import Combination, ScanKind, parse_combination
from ci_core.harness.report.figures import plot_anomaly_scores, plot_roc
from ci_core.harness.report.html import write_bench_page
from ci_core.harness.report.markdown import md_table, to_markdown
from ci_core.harness.report.scored import ScoredScan, scored_scans
from ci_core.harness.report.tables import DEFINITIONS, IMPLANT_LEVELS, _finite, build_report, implanted_model_level
from ci_core.harness.store import Store
from ci_core.scanning.variance_prior import PriorBook

__all__ = ["DEFINITIONS", "IMPLANT_LEVELS", "ScanKind", "ScoredScan", "build_report", "implanted_model_level",
           "md_table", "parse_combination", "scored_scans", "to_markdown", "write_report"]

REPORT_FILES = ("report.md", "report.json", "report.html")
REPORT_OUTPUT = "bench-report"  # the kind of output folder the report writes (ci_core.files.publishing)


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_report(store: Store, out: Path | None = None, scorer_options: dict[str, dict] | None = None,
                 combine: Sequence[Combination] = (), priors: PriorBook | None = None) -> tuple[Path, str]:
    """Write report.md, report.json, report.html and the PNG figures to ``out`` (default STORE/report) atomically."""
    out = Path(out) if out is not None else store.root / "report"
    report = build_report(store, scorer_options, combine, priors)
    with publishing(out, REPORT_OUTPUT) as work:
        figures = [name for name, plot in (("roc.png", plot_roc), ("anomaly_scores.png", plot_anomaly_scores))
                   if plot(report, work / name)]
        markdown = to_markdown(report, figures)
        (work / "report.md").write_text(markdown)
        (work / "report.json").write_text(json.dumps(_json_ready({**report, "figures": figures}), indent=2,
                                                     allow_nan=False) + "\n")
        write_bench_page(_json_ready(report), work, figures)
    return out, markdown
