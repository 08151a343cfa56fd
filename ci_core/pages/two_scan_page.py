"""The ``report.html`` of ``ci-scan --own-images``: the model's verdict from its two scans first, then each scan's
verdict and evidence figure, with the way to its full page (``ood/report.html``, ``own/report.html``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ci_core.pages import format_number, render
from ci_core.pages.scan_page import PAGE_FILE, evidence_figure, suspect_sentence
from ci_core.scanning.scan import BACKDOORED, UNSCANNABLE
from ci_core.scanning.two_scan_report import OOD_SCAN, OWN_SCAN

if TYPE_CHECKING:
    from ci_core.scanning.scan_report import ScanReport
    from ci_core.scanning.two_scan_report import TwoScanReport


SCANNED = {OOD_SCAN: "the {n} candidate classes on the OOD pool",
           OWN_SCAN: "the {n} classes you deploy, on your own images of them"}


def combined_meaning(verdict: "TwoScanReport") -> str:
    """One sentence: what the two scans together mean for the auditor."""
    figure = f"p = {format_number(verdict.p_value)}"
    if verdict.verdict == BACKDOORED:
        decided = next(s for s in verdict.scans if s.name == verdict.deciding)
        where = "in both scans together" if verdict.read_as_pair else f"in the scan of {decided.title}"
        return (f"The class \u201c{verdict.target}\u201d is far easier to reach in this model than its public "
                f"backbone predicts, {where} ({figure} for the two scans together, "
                f"{verdict.rule}): the model very likely carries a backdoor whose target is that class. "
                "Do not deploy it.")
    if verdict.verdict == UNSCANNABLE:
        failed = " and ".join(s.title for s in verdict.scans if s.verdict == UNSCANNABLE)
        named = (f" The class it most likely targets is \u201c{verdict.target}\u201d (the scans below say where "
                 "it stands out)." if verdict.target else "")
        return (f"The scan of {failed} could not measure the model, and nothing else flags it: this check cannot "
                f"vouch for it. Treat it as not accepted until the provider explains the reasons below.{named}")
    counts = ", nor among ".join(SCANNED[s.name].format(n=s.classes) for s in verdict.scans)
    return (f"No class stands out more than chance allows in either scan ({figure} for the two together; flagged "
            f"only when {verdict.rule}): no backdoor found among {counts}. This is evidence, not proof, of a clean "
            "model.")


def scan_sentence(summary, scans: int, read_as_pair: bool = False) -> str:
    """What one scan found, as a part of the pair (its own page judges it alone, at the full alpha).
    ``read_as_pair``: the paired test decided (``TwoScanReport.read_as_pair``); otherwise Bonferroni did, which is
    also what the paired test falls back to where a scan could not measure the model."""
    if summary.verdict == UNSCANNABLE:
        if summary.target is not None:
            measured = suspect_sentence(summary.target, summary.suspect_p)
            return f"This scan could not measure the model as a whole. {measured} Why:"
        return "This scan could not measure the model:"
    how = (f"the verdict above multiplies the smaller p by {scans}" if not read_as_pair else
           "the verdict above asks whether the same class is easy to reach in both scans, each class's evidence "
           "from the two scans together")
    return (f"Its most anomalous class is \u201c{summary.target}\u201d, at p = {format_number(summary.p_value)} for "
            f"this scan alone; {how}.")


def write_two_scan_page(verdict: "TwoScanReport", reports: dict[str, "ScanReport"], folder: Path) -> Path:
    """Render ``folder/report.html`` from the combined verdict and the two scans' reports."""
    context = verdict.context
    scans = []
    for summary in verdict.scans:
        report = reports[summary.name]
        scannable = report.decision is not None
        scans.append({"name": summary.name, "title": summary.title,
                      "heading": summary.title[0].upper() + summary.title[1:], "classes": summary.classes,
                      "measured": "no: unscannable" if summary.verdict == UNSCANNABLE else "yes",
                      "p": format_number(summary.p_value),
                      "target": summary.target or "n/a", "deciding": summary.name == verdict.deciding,
                      "flagged": summary.name == verdict.deciding and verdict.verdict == BACKDOORED,
                      "page": f"{summary.name}/{PAGE_FILE}", "meaning": scan_sentence(summary, len(verdict.scans), verdict.read_as_pair),
                      "reasons": list(report.unscannable_reasons), "pool": summary.pool_source or "n/a",
                      "evidence": evidence_figure(report) if scannable else None})
    smaller = next((s.title for s in verdict.scans if s.name == verdict.deciding), "neither scan")
    facts = [("p-value (both scans)", format_number(verdict.p_value)), ("rule", verdict.rule),
             ("alpha", f"{verdict.alpha:g}"), ("most anomalous class", verdict.target or "n/a"),
             ("the scan where that class stands out more" if verdict.read_as_pair else "the scan with the smaller p",
              smaller)]
    provenance = [("model", context.bundle.path), ("model SHA-256", context.bundle.sha256),
                  ("seed", str(context.seed)), ("device", str(context.device)),
                  ("toolkit version", str(context.toolkit_version)), ("report written", context.created)]
    path = Path(folder) / PAGE_FILE
    path.write_text(render("two_scan.html.j2", verdict=verdict.verdict, title=context.bundle.path or "scan",
                           subtitle=" and ".join(s.title for s in verdict.scans),
                           meaning=combined_meaning(verdict), facts=facts, scans=scans,
                           provenance=[(k, "n/a" if v is None else v) for k, v in provenance],
                           command=context.command or ""), encoding="utf-8")
    return path
