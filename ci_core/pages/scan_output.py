"""A scan's output folder: ``report.json`` (the typed ``ScanReport``), ``report.html`` and ``triggers/``.

``write_scan`` is the one writer: ``ci-scan``, ``ci-bench demo`` and the harness's scan cells all call it.  The
folder is built whole in ``publishing(out, "scan")`` (``ci_core.files``) and renamed into place; JSON goes through
``write_json_atomic``, which refuses NaN.  Per class, ``triggers/`` holds the trigger's tensors and an image strip
of clean, stamped and amplified-change held-out images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from ci_core.data.ood import OODPool
from ci_core.files import publishing, write_json_atomic
from ci_core.scanning.scan import SCAN_OUTPUT, ScanResult
from ci_core.scanning.scan_report import REPORT_FILE, TRIGGERS_DIR, ScanContext, ScanReport


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
    from ci_core.pages.scan_page import write_scan_page  # the page's imports (Jinja2, matplotlib) only when writing

    report = ScanReport.build(result, context, pool)
    with publishing(out, SCAN_OUTPUT) as tmp:
        triggers = tmp / TRIGGERS_DIR
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
        write_json_atomic(tmp / REPORT_FILE, report.to_json())
        write_scan_page(report, tmp)
    return Path(out).absolute() / REPORT_FILE
