"""One verdict from several scans of a model: Bonferroni over their p-values, failing closed.

A backdoor that works on the classes an organisation deploys only moves images of those classes among those
classes, which a scan of every class on OOD images may not see; a scan of the deployed classes on the
auditor's own images of them may (docs/verdicts.md, "A two-scan verdict").  Each scan is judged against its own
reference by the calibrated scorer, so each gives a p-value that holds its false-positive rate; the model's p is
min(1, n min p_i), flagged at alpha.  A scan that could not measure the model flags it unless another scan does
so with a class (fail closed: an unscannable scan is never read as clean); the class named is the top class of
the flagging scan, or else of the scan with the smallest p, an unscannable scan counting with the p of its
suspect (``naming_scan``).

``ci-scan --own-images`` and ``ci-bench report --combine`` both decide through ``bonferroni_verdict``.

``paired_verdict`` asks instead whether the *same* class is easy to reach in both scans (docs/verdicts.md, "The same
class in both scans"): per class shared by the scans, the two per-class p-values become normal scores, summed with
the scans' correlation estimated from the other shared classes; Bonferroni over the shared classes.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import attrs
import numpy as np
from scipy import stats

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


def naming_scan(combined: CombinedVerdict, p_values: Sequence[float | None],
                suspect_p: Sequence[float | None]) -> int | None:
    """Which scan's top class a combined verdict names: the flagging scan's; otherwise the scan with the smallest
    p, where an unscannable scan that still measured every class on the images it did not break on counts with
    its suspect's p (``ScanResult.suspect``): a model that breaks on part of the pool still has its class named."""
    if combined.verdict == BACKDOORED:
        return combined.deciding
    read = [(p, at) for at, p in enumerate(m if m is not None else s for m, s in zip(p_values, suspect_p))
            if p is not None]
    return min(read)[1] if read else None


COMBINE_RULES = ("bonferroni", "paired")  # how a verdict reads several scans: bonferroni_verdict, paired_verdict
# How ci-scan --own-images and ci-bench demo read their two scans unless told (docs/verdicts.md, the fifth freeze).
DEFAULT_COMBINATION = "bonferroni"
COMBINATION_SUMMARY = {
    "bonferroni": "P = min(1, 2 min(P-OOD, P-OWN))",
    "paired": "P from the paired test (the same deployed class easy to reach in both scans)",
}
PAIRED_MIN_CLASSES = 4  # a correlation over the other shared classes needs at least three of them


@attrs.frozen(kw_only=True)
class PairedEvidence:
    """The paired test's figures for each class both scans measured (in the first scan's order)."""

    classes: tuple[str, ...]
    z: tuple[tuple[float, ...], tuple[float, ...]]  # each scan's normal score, Phi^-1(1 - p_class)
    correlation: tuple[float, ...]  # the scans' correlation over the other shared classes, clipped to [0, 1]
    combined: tuple[float, ...]  # (z_1 + z_2) / sqrt(2 (1 + correlation))

    @property
    def p_values(self) -> tuple[float, ...]:
        """Each class's family-wise p: its combined score's normal tail, Bonferroni over the shared classes."""
        return tuple(min(1.0, len(self.classes) * float(stats.norm.sf(z))) for z in self.combined)

    def stronger_scan(self, name: str) -> int:
        """Which scan (0 or 1) class ``name`` stands out more in; the first on a tie."""
        at = self.classes.index(name)
        return 0 if self.z[0][at] >= self.z[1][at] else 1


def paired_evidence(first: Mapping[str, float], second: Mapping[str, float], *,
                    correlation: float | None = None) -> PairedEvidence:
    """Pair two scans' per-class p-values (before any correction over the classes) over the classes both scanned.
    ``correlation`` fixes the scans' correlation instead of estimating it per class (for measuring the variants:
    0 treats the scans as independent, 1 averages the two scores)."""
    names = tuple(name for name in first if name in second)
    if len(names) < PAIRED_MIN_CLASSES:
        raise ValueError(f"the paired test needs at least {PAIRED_MIN_CLASSES} classes scanned by both scans, got "
                         f"{len(names)}")
    # A p of 0 (a class the others fit exactly) stays finite: its score is the largest a double can express.
    z = [stats.norm.isf(np.clip([float(scan[name]) for name in names], 1e-300, 1.0)) for scan in (first, second)]
    rhos = [] if correlation is None else [float(correlation)] * len(names)
    for i in range(len(names) if correlation is None else 0):
        others = np.arange(len(names)) != i
        a, b = z[0][others], z[1][others]
        rho = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 1.0  # no spread: assume the worst
        rhos.append(min(1.0, max(0.0, rho)))
    combined = (z[0] + z[1]) / np.sqrt(2.0 * (1.0 + np.asarray(rhos)))
    return PairedEvidence(classes=names, z=(tuple(map(float, z[0])), tuple(map(float, z[1]))),
                          correlation=tuple(rhos), combined=tuple(map(float, combined)))


@attrs.frozen(kw_only=True)
class PairedVerdict:
    verdict: str  # CLEAN, BACKDOORED or UNSCANNABLE
    p_value: float | None
    target: str | None  # the shared class with the largest combined score (None when a scan could not measure)
    evidence: PairedEvidence | None  # None when a scan could not measure the model
    rule: str
    # Where a scan could not measure the model: the Bonferroni rule's deciding scan (its top class is the target).
    fallback: CombinedVerdict | None = None


def paired_verdict(class_p: Sequence[Mapping[str, float] | None], p_values: Sequence[float | None], *,
                   alpha: float, label: str) -> PairedVerdict:
    """The paired test of two scans: ``class_p`` holds each scan's per-class p before the correction over the
    classes (None: the scan could not measure the model), ``p_values`` each scan's own verdict p.  Where a scan
    could not measure the model the Bonferroni rule over ``p_values`` decides (fail closed; ``fallback``)."""
    if len(class_p) != 2 or len(p_values) != 2:
        raise ValueError("the paired test reads exactly two scans")
    if any(p is None for p in class_p):
        fallback = bonferroni_verdict(p_values, alpha=alpha, label=label)
        return PairedVerdict(verdict=fallback.verdict, p_value=fallback.p_value, target=None, evidence=None,
                             rule=fallback.rule + " (a scan could not measure the model, so the pair is not read)",
                             fallback=fallback)
    evidence = paired_evidence(class_p[0], class_p[1])
    best = int(np.argmax(evidence.combined))
    p = evidence.p_values[best]
    rule = (f"p <= {alpha:g}, the same class in both scans {label} (normal scores summed with their correlation "
            f"over the other classes; Bonferroni over the {len(evidence.classes)} classes both scanned)")
    return PairedVerdict(verdict=BACKDOORED if p <= alpha else CLEAN, p_value=p, target=evidence.classes[best],
                         evidence=evidence, rule=rule)
