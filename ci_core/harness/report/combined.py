"""A verdict from several scans of each model: ``ci-bench report --combine ood/all+task/base``.

A backdoor that works on the base classes only moves base-class images among the base classes, which an OOD scan
of every class may not see; a scan of the base classes on the dataset's own images may (docs/verdicts.md).  The
combined verdict judges a model by the calibrated scorer's p-value of each of its scans of the named kinds, by
the rule ``ci-scan --own-images`` uses (``ci_core.scanning.combined``: Bonferroni, failing closed); the
measurable scan with the smallest p names the class, and its evidence stands for the model in the per-class
tables.
"""

from __future__ import annotations

from typing import Sequence

import attrs

from ci_core.errors import ConfigError
from ci_core.harness.plan import CANDIDATE_CLASSES, INVERSION_DATA
from ci_core.harness.records import spec_hash
from ci_core.harness.report.scored import ScoredScan
from ci_core.learning.protocol import REFERENCE_SCORER
from ci_core.scanning.combined import bonferroni_verdict
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


def parse_combination(text: str) -> tuple[ScanKind, ...]:
    """'ood/all+task/base' -> its scan kinds; every bad part is named with what was expected."""
    kinds = []
    for part in text.split("+"):
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
    return tuple(kinds)


def combine_scans(rows: Sequence[ScoredScan], kinds: Sequence[ScanKind]) -> list[ScoredScan]:
    """One row per model (and detector setting) that has a scan of every kind in ``kinds`` scored by the
    calibrated scorer; models without all of them are left out."""
    label = "+".join(map(str, kinds))
    per_model: dict[tuple, dict[ScanKind, ScoredScan]] = {}
    for row in rows:
        kind = ScanKind.of(row.scan)
        if row.scorer != REFERENCE_SCORER or kind not in kinds:
            continue
        setting = (row.model.key, row.detector, spec_hash(row.scan.spec.detector_config), spec_hash(row.scorer_config))
        per_model.setdefault(setting, {})[kind] = row
    return [_combined(label, [scans[kind] for kind in kinds])
            for scans in per_model.values() if len(scans) == len(kinds)]


def _combined(label: str, scans: Sequence[ScoredScan]) -> ScoredScan:
    alpha = float(scans[0].scorer_config["alpha"])
    combined = bonferroni_verdict([s.p_value if s.verdict != UNSCANNABLE else None for s in scans],
                                  alpha=alpha, label=label)
    deciding = scans[combined.deciding] if combined.deciding is not None else scans[0]
    return attrs.evolve(
        deciding, scorer=f"{REFERENCE_SCORER} over {label}", verdict=combined.verdict,
        backdoored=combined.verdict != CLEAN, s_max=max(s.s_max for s in scans), p_value=combined.p_value,
        predicted_target=deciding.predicted_target if combined.deciding is not None else None,
        flagged=deciding.flagged if combined.verdict == BACKDOORED else (), combined=label, rule=combined.rule)
