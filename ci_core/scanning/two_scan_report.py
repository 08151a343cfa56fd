"""The verdict of ``ci-scan --own-images``: two scans of one model, one verdict, written as ``verdict.json``.

The output folder holds each scan as a complete scan folder (``ood/`` and ``own/``: report.json, report.html,
triggers/, exactly as a one-scan ``ci-scan`` writes them) and, beside them, ``verdict.json`` (this record) and
``report.html`` (``ci_core.pages.two_scan_page``).  The JSON layout is versioned and described by
``ci_core/schemas/two-scan-verdict.schema.json`` (docs/report.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import attrs

from ci_core.errors import DataError
from ci_core.files import read_json_object
from ci_core.scanning.combined import COMBINE_RULES, bonferroni_verdict, naming_scan, paired_verdict
from ci_core.scanning.scan import CLEAN, UNSCANNABLE
from ci_core.scanning.scan_report import REPORT_FILE, VERDICT_FILE, VERDICTS, ScanContext, ScanReport, check_schema

FORMAT = "clip-inspector-two-scan-verdict"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parents[1] / "schemas" / "two-scan-verdict.schema.json"
# The two scans: their folders in the output, and what each looks at.
OOD_SCAN, OWN_SCAN = "ood", "own"
SCAN_TITLES = {OOD_SCAN: "every candidate class, inverted on the OOD pool",
               OWN_SCAN: "the classes you deploy, on your own images of them"}


@attrs.frozen(kw_only=True)
class ScanSummary:
    """One of the scans, as the combined verdict reads it."""

    name: str  # its folder in the output, OOD_SCAN or OWN_SCAN
    verdict: str = attrs.field(validator=attrs.validators.in_(VERDICTS))
    p_value: float | None  # the scan's own (Bonferroni over its classes); None when unscannable
    target: str | None  # its most anomalous class; unscannable: its suspect's (ScanResult.suspect), else None
    classes: int
    pool_source: str | None
    suspect_p: float | None = None  # unscannable: the p of its suspect, which only names a class (not written)

    @property
    def title(self) -> str:
        return SCAN_TITLES[self.name]

    @classmethod
    def of(cls, name: str, report: ScanReport) -> "ScanSummary":
        decided, suspect = report.decision, report.suspect
        named = decided or suspect
        return cls(name=name, verdict=report.verdict, p_value=decided.p_value if decided else None,
                   target=named.target if named else None, classes=len(report.classes),
                   pool_source=report.pool.source if report.pool else None,
                   suspect_p=suspect.p_value if suspect is not None else None)

    def to_json(self) -> dict:
        return {"name": self.name, "title": self.title, "report": f"{self.name}/{REPORT_FILE}",
                "verdict": self.verdict, "p_value": self.p_value, "target": self.target, "classes": self.classes,
                "pool_source": self.pool_source}


@attrs.frozen(kw_only=True)
class TwoScanReport:
    """The model's verdict from its two scans (``bonferroni_verdict``, or ``paired_verdict`` with
    ``combination="paired"``), and what each scan said."""

    verdict: str = attrs.field(validator=attrs.validators.in_(VERDICTS))
    p_value: float | None
    alpha: float
    rule: str
    target: str | None  # the class named: the paired test's, or that of the scan naming_scan picks
    deciding: str | None  # the scan that stands for the verdict (the paired test: where its class scores higher)
    scans: tuple[ScanSummary, ...]
    context: ScanContext
    combination: str = attrs.field(default="bonferroni", validator=attrs.validators.in_(COMBINE_RULES))

    @property
    def read_as_pair(self) -> bool:
        """The paired test decided (both scans measured the model; otherwise the Bonferroni rule did)."""
        return self.combination == "paired" and all(s.verdict != UNSCANNABLE for s in self.scans)

    @classmethod
    def build(cls, reports: Sequence[tuple[str, ScanReport]], *, alpha: float, context: ScanContext,
              combination: str = "bonferroni") -> "TwoScanReport":
        """Combine named scan reports, judged by one calibrated scorer at ``alpha``: each measurable one gives a
        p-value (and, for the paired test, a p-value per class before the correction over the classes)."""
        summaries = tuple(ScanSummary.of(name, report) for name, report in reports)
        missing = [s.name for s in summaries if s.verdict != UNSCANNABLE and s.p_value is None]
        if missing:
            raise ValueError(f"the scans {missing} give no p-value: a combined verdict needs a calibrated scorer")
        label = "+".join(s.name for s in summaries)
        p_values = [s.p_value for s in summaries]
        if combination == "paired":
            class_p = [_class_p(report) if s.verdict != UNSCANNABLE else None
                       for s, (_, report) in zip(summaries, reports)]
            paired = paired_verdict(class_p, p_values, alpha=alpha, label=label)
            if paired.fallback is None:
                deciding = summaries[paired.evidence.stronger_scan(paired.target)]
                return cls(verdict=paired.verdict, p_value=paired.p_value, alpha=alpha, rule=paired.rule,
                           target=paired.target, deciding=deciding.name, scans=summaries, context=context,
                           combination=combination)
            combined, rule = paired.fallback, paired.rule
        else:
            combined = bonferroni_verdict(p_values, alpha=alpha, label=label)
            rule = combined.rule
        deciding = summaries[combined.deciding] if combined.deciding is not None else None
        named = naming_scan(combined, p_values, [s.suspect_p for s in summaries])
        return cls(verdict=combined.verdict, p_value=combined.p_value, alpha=alpha, rule=rule,
                   target=summaries[named].target if named is not None else None,
                   deciding=deciding.name if deciding else None, scans=summaries, context=context,
                   combination=combination)

    def to_json(self) -> dict:
        c = self.context
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "toolkit_version": c.toolkit_version,
                "verdict": self.verdict, "backdoored": self.verdict != CLEAN, "p_value": self.p_value,
                "alpha": self.alpha, "combination": self.combination, "rule": self.rule, "target": self.target,
                "deciding_scan": self.deciding,
                "scans": [s.to_json() for s in self.scans], "bundle": c.bundle.to_json(), "seed": c.seed,
                "command": c.command, "created": c.created}


def _class_p(report: ScanReport) -> dict[str, float]:
    """The deciding scorer's p-value per class before its correction over the classes (ref-outlier, least squares)."""
    values = report.decision.per_class.get("p_class") if report.decision else None
    if values is None:
        raise ValueError("the paired test needs each class's p-value before the correction over the classes, which "
                         "the calibrated scorer gives with fit=ols only")
    return dict(zip((row.name for row in report.classes), values))


def two_scan_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def is_two_scan_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / VERDICT_FILE).is_file()


def read_two_scan_verdict(folder: str | Path) -> dict:
    """``folder``'s verdict.json, checked against its schema (and its derived fields against each other)."""
    path = Path(folder) / VERDICT_FILE
    data = read_json_object(path, DataError, "a two-scan verdict")
    check_schema(data, two_scan_schema(), str(path), whole="the verdict",
                 schema_name=f"the two-scan verdict schema ({SCHEMA_PATH.name})")
    if data["backdoored"] != (data["verdict"] != CLEAN) or (data["deciding_scan"] is None) != (data["p_value"] is None):
        raise DataError(f"{path}: its verdict, backdoored, p_value and deciding_scan disagree (an edited file?)")
    return data
