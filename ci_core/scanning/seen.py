"""Which candidate classes a model was tuned on (its bundle's base classes): ``ClassEvidence.seen``.

Prompt tuning makes the classes it was tuned on easier to reach as a group, so the calibrated verdict
(``ref-outlier``) gives them their own intercept, and the scan page draws them apart.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import numpy as np

from ci_core.interfaces import ClassEvidence

MIN_GROUP = 3  # seen and unseen candidates each, for the seen classes' own intercept


def mark_seen(evidence: Sequence[ClassEvidence], base_classes: Sequence[str] | None) -> tuple[ClassEvidence, ...]:
    """``evidence`` with each class's ``seen`` flag: whether it is one of the model's ``base_classes`` (the classes
    it was tuned on; None: unknown, flags left as they are).  A flag already recorded is kept."""
    if base_classes is None:
        return tuple(evidence)
    base = set(base_classes)
    return tuple(e if e.seen is not None else attrs.evolve(e, seen=e.name in base) for e in evidence)


def seen_column(evidence: Sequence[ClassEvidence]) -> np.ndarray | None:
    """The 0/1 column of the classes the model was tuned on, where the candidates hold at least MIN_GROUP seen and
    MIN_GROUP unseen classes with known flags; None otherwise (the line alone).  A class alone in its group would be
    fitted exactly by its intercept and could never stand out."""
    flags = [e.seen for e in evidence]
    if any(f is None for f in flags):
        return None
    seen = np.asarray(flags, dtype=np.float64)
    return seen if MIN_GROUP <= seen.sum() <= len(seen) - MIN_GROUP else None


def line_design(x: Sequence[float], seen: np.ndarray | None = None) -> np.ndarray:
    """The columns ref-outlier fits the model's per-class values on (and the scan page draws): an intercept, the
    backbone's values (where they vary) and, given, the seen classes' own intercept."""
    x = np.asarray(x, dtype=np.float64)
    columns = [np.ones(len(x))] + ([x] if np.ptp(x) > 0 else []) + ([seen] if seen is not None else [])
    return np.column_stack(columns)
