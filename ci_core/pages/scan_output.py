"""A scan's output folder: ``report.json`` (the typed ``ScanReport``), ``report.html`` and ``triggers/``.

``write_scan`` is the one writer: ``ci-scan``, ``ci-bench demo`` and the harness's scan cells all call it;
``write_two_scans`` writes two such folders side by side with their combined verdict (``ci-scan --own-images``).  The
folder is built whole in ``publishing(out, "scan")`` (``ci_core.files``) and renamed into place; JSON goes through
``write_json_atomic``, which refuses NaN.  Per class, ``triggers/`` holds the trigger's tensors and an image strip
of clean, stamped and amplified-change held-out images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torchvision.utils import save_image

from ci_core.data.ood import OODPool
from ci_core.files import publishing, write_json_atomic
from ci_core.scanning.scan import SCAN_OUTPUT, ScanResult
from ci_core.scanning.scan_report import REPORT_FILE, TRIGGERS_DIR, ScanContext, ScanReport
from ci_core.scanning.two_scan_report import VERDICT_FILE, TwoScanReport


def trigger_strip(examples: torch.Tensor, triggered: torch.Tensor) -> torch.Tensor:
    """Rows of clean images, the same images triggered, and the change amplified to the full range (grey = none)."""
    delta = triggered - examples
    scale = float(delta.abs().max())
    amplified = 0.5 + 0.5 * delta / scale if scale > 0 else torch.full_like(delta, 0.5)
    return torch.cat([examples, triggered, amplified.clamp(0, 1)])


def write_scan(result: ScanResult, out: str | Path, pool: OODPool, context: ScanContext) -> Path:
    """Write ``report.json``, ``report.html`` and ``triggers/`` (per class: tensors, and an image strip of clean,
    triggered and amplified-change images) atomically; returns the path of report.json.

    ``out`` may be missing or an earlier scan folder (``ci_core.files.publishing``); nothing else is replaced.
    """
    report = ScanReport.build(result, context, pool)
    with publishing(out, SCAN_OUTPUT) as tmp:
        _fill_scan_folder(tmp, report, result, pool)
    return Path(out).absolute() / REPORT_FILE


def write_two_scans(scans: Sequence[tuple[str, ScanResult, OODPool]], out: str | Path, context: ScanContext, *,
                    alpha: float, combination: str = "bonferroni") -> TwoScanReport:
    """``ci-scan --own-images``'s folder, written atomically: each named scan as a complete scan folder
    (``out/<name>/``), the combined verdict (``verdict.json``) and the page that shows both (``report.html``)."""
    from ci_core.pages.two_scan_page import write_two_scan_page

    reports = {name: ScanReport.build(result, context, pool) for name, result, pool in scans}
    verdict = TwoScanReport.build(list(reports.items()), alpha=alpha, context=context, combination=combination)
    with publishing(out, SCAN_OUTPUT) as tmp:
        for name, result, pool in scans:
            (tmp / name).mkdir()
            _fill_scan_folder(tmp / name, reports[name], result, pool)
        write_json_atomic(tmp / VERDICT_FILE, verdict.to_json())
        write_two_scan_page(verdict, reports, tmp)
    return verdict


def _fill_scan_folder(folder: Path, report: ScanReport, result: ScanResult, pool: OODPool) -> None:
    from ci_core.pages.scan_page import write_scan_page  # the page's imports (Jinja2, matplotlib) only when writing

    triggers = folder / TRIGGERS_DIR
    triggers.mkdir()
    examples = pool.holdout[:4]
    for row, evidence in zip(report.classes, result.classes):
        if row.trigger_file is None:  # a result whose triggers were not kept has none to write
            continue
        stem = Path(row.trigger_file).stem
        evidence.trigger.save(triggers / f"{stem}.safetensors")
        with torch.no_grad():
            stamped = evidence.trigger.apply(examples)
        save_image(trigger_strip(examples, stamped), triggers / f"{stem}.png", nrow=len(examples))
    write_json_atomic(folder / REPORT_FILE, report.to_json())
    write_scan_page(report, folder)
