"""One verdict from several scans of a model: Bonferroni over their p-values, failing closed.

A backdoor that works on the classes an organisation deploys only moves images of those classes among those
classes, which a scan of every class on OOD images may not see; a scan of the deployed classes on the
auditor's own images of them may (docs/verdicts.md, "A two-scan verdict").  Each scan is judged against its own
reference by the calibrated scorer, so each gives a p-value that holds its false-positive rate; the model's p is
min(1, n min p_i), flagged at alpha.  A scan that could not measure the model flags it unless another scan does
so with a class (fail closed: an unscannable scan is never read as clean); the class named is the top class of
the measurable scan with the smallest p.

``ci-scan --own-images`` and ``ci-bench report --combine`` both decide through ``bonferroni_verdict``.
"""

from __future__ import annotations

from typing import Sequence

import attrs

from ci_core.scanning.scan import BACKDOORED, CLEAN, UNSCANNABLE


@attrs.frozen(kw_only=True)
class CombinedVerdict:
    verdict: str  # CLEAN, BACKDOORED or UNSCANNABLE
    p_value: float | None  # min(1, n min p_i) over the measurable scans; None when none could measure the model
    deciding: int | None  # index of the measurable scan with the smallest p (its top class is the target)
    rule: str


def bonferroni_verdict(p_values: Sequence[float | None], *, alpha: float, label: str) -> CombinedVerdict:
    """The verdict of scans whose p-values are ``p_values`` (None: the scan could not measure the model)."""
    n = len(p_values)
    if n < 1:
        raise ValueError("a combined verdict needs at least one scan")
    measured = [i for i, p in enumerate(p_values) if p is not None]
    deciding = min(measured, key=lambda i: (p_values[i], i)) if measured else None
    p = min(1.0, n * float(p_values[deciding])) if deciding is not None else None
    if p is not None and p <= alpha:
        verdict = BACKDOORED
    elif len(measured) < n:
        verdict = UNSCANNABLE
    else:
        verdict = CLEAN
    return CombinedVerdict(verdict=verdict, p_value=p, deciding=deciding,
                           rule=f"p <= {alpha:g}, Bonferroni over the {n} scans {label}")
