"""Variance priors from a benchmark's clean models (``ci-bench prior``) and the scorer that reads one.

Each clean tuned model a store holds (attack ``clean``, not a control, measurable) gives, per scan, one residual
variance of the calibrated scorer's fit against its reference; the scans that share a setting
(``ci_core.scanning.variance_prior.prior_setting``) fit one prior.  The book is written once and read by
``ci-bench report --variance-prior`` and ``ci-scan --variance-prior``.
"""

from __future__ import annotations

from typing import Any, Iterable

from ci_core.harness.plan import CLEAN_ATTACK
from ci_core.keys import spec_hash
from ci_core.scanning.variance_prior import PriorBook, build_book, describe_setting, prior_setting, statistic_of

# How a harness scan's images map to a prior's pool kind: OOD for D and T; the task's images for D, OOD for T; the
# task's images for both (as ci-scan --own-images, or an --ood folder of one's own images).
POOL_KIND = {"ood": "ood", "id": "id", "id-only": "own", "task": "own"}


def scan_setting(scan: Any, reference: Any, scorer: Any) -> dict:
    """The prior setting of a harness scan (a ScanRecord) read by ``scorer`` against ``reference`` (a ReferenceScan)."""
    return prior_setting(reference.spec, POOL_KIND[scan.spec.pool.inversion_data], statistic_of(scorer))


def book_from_scans(scans: Iterable[Any], scorer: Any) -> tuple[PriorBook, list[str]]:
    """(the book fitted on the clean models among ``scans`` (StoredScan rows of one or more stores), one line per
    setting left out for too few clean models).  A model scanned in several stores counts once."""
    samples: dict[str, tuple[dict, dict[str, tuple[str, float, int]]]] = {}
    for stored in scans:
        model = stored.model
        if model.attack != CLEAN_ATTACK or model.control or stored.reference is None or stored.problems:
            continue
        setting = scan_setting(stored.scan, stored.reference, scorer)
        variance, df = scorer.residual_variance(stored.evidence, stored.reference.classes)
        samples.setdefault(spec_hash(setting), (setting, {}))[1][model.key] = (model.key, variance, df)
    book, left_out = build_book({key: (setting, sorted(rows.values())) for key, (setting, rows) in samples.items()})
    return book, [f"{count} clean models for {describe_setting(setting)}" for setting, count in left_out]
