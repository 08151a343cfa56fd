"""A verdict from several scans of each model: ``ci-bench report --combine [paired:]ood/all+task/base``.

A backdoor that works on the base classes only moves base-class images among the base classes, which an OOD scan
of every class may not see; a scan of the base classes on the dataset's own images may (docs/verdicts.md).  The
combined verdict judges a model by the calibrated scorer's p-value of each of its scans of the named kinds, by
the rule ``ci-scan --own-images`` uses (``ci_core.scanning.combined``: Bonferroni, failing closed); the
measurable scan with the smallest p names the class, and its evidence stands for the model in the per-class
tables.  ``paired:`` reads two scans by the paired test instead (``paired_verdict``: the same class easy to reach in
both); its class is the one with the largest combined score, and the scan where that class scores higher stands
for the model.
"""

from __future__ import annotations

from typing import Sequence

import math

import attrs

from ci_core.errors import ConfigError
from ci_core.harness.plan import CANDIDATE_CLASSES, INVERSION_DATA
from ci_core.harness.records import spec_hash
from ci_core.harness.report.scored import ScoredScan
from ci_core.learning.protocol import REFERENCE_SCORER
from ci_core.scanning.combined import COMBINE_RULES, bonferroni_verdict, naming_scan, paired_verdict
from ci_core.scanning.scan import BACKDOORED, CLEAN, UNSCANNABLE


@attrs.frozen
class ScanKind:
    """Which images a scan inverted on (``--inversion-data``) and which classes it scanned (``--candidate-classes``)."""

    inversion_data: str
    classes: str

    def __str__(self) -> str:
        return f"{self.inversion_data}/{self.classes}"

    @classmethod
    def of(cls, scan) -> "ScanKind":
        """The kind of a scan cell or record (anything with its ``spec``)."""
        return cls(scan.spec.pool.inversion_data, scan.spec.classes)


@attrs.frozen
class Combination:
    """The scan kinds a combined verdict reads, and its rule."""

    kinds: tuple[ScanKind, ...]
    rule: str = "bonferroni"

    def __str__(self) -> str:
        kinds = "+".join(map(str, self.kinds))
        return kinds if self.rule == "bonferroni" else f"{self.rule}:{kinds}"


def parse_combination(text: str) -> Combination:
    """'ood/all+task/base' or 'paired:ood/all+task/base' -> its scan kinds and rule; every bad part is named with
    what was expected."""
    rule, colon, body = text.partition(":")
    if not colon:
        rule, body = "bonferroni", text
    elif rule not in COMBINE_RULES:
        raise ConfigError(f"--combine {text!r}: {rule!r} is not a rule; expected one of {', '.join(COMBINE_RULES)} before "
                          "':' (or no prefix for bonferroni)")
    kinds = []
    for part in body.split("+"):
        data, slash, classes = part.strip().partition("/")
        if not slash or data not in INVERSION_DATA or classes not in CANDIDATE_CLASSES:
            raise ConfigError(f"--combine {text!r}: {part!r} is not a scan kind DATA/CLASSES with DATA one of "
                              f"{', '.join(INVERSION_DATA)} and CLASSES one of {', '.join(CANDIDATE_CLASSES)}")
        kind = ScanKind(data, classes)
        if kind in kinds:
            raise ConfigError(f"--combine {text!r}: {kind} is named twice")
        kinds.append(kind)
    if len(kinds) < 2:
        raise ConfigError(f"--combine {text!r}: name at least two scan kinds joined by '+', e.g. ood/all+task/base")
    if rule == "paired" and len(kinds) != 2:
        raise ConfigError(f"--combine {text!r}: the paired test reads exactly two scan kinds, got {len(kinds)}")
    return Combination(tuple(kinds), rule)


def combine_scans(rows: Sequence[ScoredScan], combination: Combination) -> list[ScoredScan]:
    """One row per model (and detector setting) that has a scan of every kind of ``combination`` scored by the
    calibrated scorer; models without all of them are left out."""
    kinds, label = combination.kinds, str(combination)
    per_model: dict[tuple, dict[ScanKind, ScoredScan]] = {}
    for row in rows:
        kind = ScanKind.of(row.scan)
        if row.scorer != REFERENCE_SCORER or kind not in kinds:
            continue
        setting = (row.model.key, row.detector, spec_hash(row.scan.spec.detector_config), spec_hash(row.scorer_setting))
        per_model.setdefault(setting, {})[kind] = row
    read = _paired if combination.rule == "paired" else _combined
    return [read(label, [scans[kind] for kind in kinds]) for scans in per_model.values() if len(scans) == len(kinds)]


def _combined(label: str, scans: Sequence[ScoredScan]) -> ScoredScan:
    alpha = float(scans[0].scorer_config["alpha"])
    p_values = [s.p_value if s.verdict != UNSCANNABLE else None for s in scans]
    combined = bonferroni_verdict(p_values, alpha=alpha, label=label)
    named = naming_scan(combined, p_values, [s.suspect_p for s in scans])
    deciding = scans[combined.deciding] if combined.deciding is not None else scans[0]
    return attrs.evolve(
        deciding, scorer=f"{REFERENCE_SCORER} over {label}", verdict=combined.verdict,
        backdoored=combined.verdict != CLEAN, s_max=max(s.s_max for s in scans), p_value=combined.p_value,
        predicted_target=scans[named].predicted_target if named is not None else None,
        flagged=deciding.flagged if combined.verdict == BACKDOORED else (), combined=label, rule=combined.rule,
        suspect_p=None)


def _paired(label: str, scans: Sequence[ScoredScan]) -> ScoredScan:
    measured = [s.verdict != UNSCANNABLE for s in scans]
    for scan, ok in zip(scans, measured):
        if ok and scan.class_p is None:
            raise ConfigError(f"--combine {label}: the scorer of scan {scan.key} gives no per-class p-value before "
                              "its correction (the paired test needs ref-outlier with fit=ols)")
    alpha = float(scans[0].scorer_config["alpha"])
    verdict = paired_verdict([s.class_p if ok else None for s, ok in zip(scans, measured)],
                             [s.p_value if ok else None for s in scans], alpha=alpha, label=label)
    # One rule for every row of the combination, whatever its number of classes (the report lists distinct ones).
    rule = (f"p <= {alpha:g}, the same class in both scans {label} (Bonferroni over the classes both scanned; where "
            "a scan could not measure the model, over the scans)")
    if verdict.fallback is not None:
        return attrs.evolve(_combined(label, scans), rule=rule)  # the Bonferroni rule, failing closed
    evidence = verdict.evidence
    stands = scans[evidence.stronger_scan(verdict.target)]
    flagged = tuple(name for name, p in zip(evidence.classes, evidence.p_values)
                    if verdict.verdict == BACKDOORED and p <= alpha)
    return attrs.evolve(
        stands, scorer=f"{REFERENCE_SCORER} over {label}", verdict=verdict.verdict,
        backdoored=verdict.verdict != CLEAN, s_max=-math.log10(max(verdict.p_value, 1e-300)),  # ranks as p does
        p_value=verdict.p_value, predicted_target=verdict.target, flagged=flagged, combined=label, rule=rule,
        class_p=None)
