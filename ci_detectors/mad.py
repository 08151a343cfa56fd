"""``mad`` scorer: Neural Cleanse's outlier rule (Wang et al., S&P 2019), for any per-class statistic.

The original (bolunwang/backdoor, ``mad_outlier_detection.py``) takes the mask
l1 norm of every class, its median m and the median absolute deviation
MAD = 1.4826 * median(|x - m|) (1.4826 makes it a consistent estimate of the
standard deviation of normal data), and flags every class whose norm lies
below the median with anomaly index |x - m| / MAD > 2.  A backdoor target is
the class that needs an abnormally *small* trigger, so only the low side counts.

Here the per-class score is the signed index (m - x) / MAD: positive below the
median, so larger means more suspicious and s_max is the most anomalous class.
A class is flagged iff its score > k, and the model is backdoored iff some
class is flagged (the original's strict inequality, so the verdict and the
flagged list always agree).

Where more than half of the classes share one value the MAD is 0 and the
original divides by zero; we then fall back to the mean absolute deviation
times sqrt(pi/2) (its consistency constant; the usual fallback of the modified
z-score), and if that is 0 too every value equals the median and all scores are 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import attrs
import numpy as np

from ci_core.errors import ConfigError
from ci_core.interfaces import ClassEvidence, Scorer, Scores
from ci_core.validators import number

MAD_CONSISTENCY = 1.4826
MEAN_AD_CONSISTENCY = math.sqrt(math.pi / 2)  # 1.2533...


def robust_scale(values: Sequence[float]) -> tuple[float, float]:
    """(median, scale): scale is 1.4826 * MAD, or 1.2533 * mean absolute deviation when the MAD is 0."""
    x = np.asarray(values, dtype=np.float64)
    median = float(np.median(x))
    deviations = np.abs(x - median)
    scale = MAD_CONSISTENCY * float(np.median(deviations))
    if scale == 0:
        scale = MEAN_AD_CONSISTENCY * float(deviations.mean())
    return median, scale


def anomaly_indices(values: Sequence[float]) -> np.ndarray:
    """Signed anomaly index (median - x) / scale of every value: positive below the median."""
    x = np.asarray(values, dtype=np.float64)
    median, scale = robust_scale(x)
    if scale == 0:
        return np.zeros_like(x)
    return (median - x) / scale


@attrs.frozen(kw_only=True)
class MADScorerConfig:
    k: float = attrs.field(default=2.0, validator=number(gt=0))


class MADScorer(Scorer):
    name = "mad"
    description = "Neural Cleanse's rule: anomaly index (median - statistic) / (1.4826 MAD); flags classes with index > k"
    Config = MADScorerConfig

    def score(self, evidence: Sequence[ClassEvidence], reference=None) -> Scores:
        self.check_inputs(classes=len(evidence), reference=reference is not None)
        missing = [e.name for e in evidence if e.statistic is None]
        if missing:
            raise ConfigError(
                f"the mad scorer ranks each class by its detector's own statistic, but the detector reported none "
                f"for {missing[:5]}{' ...' if len(missing) > 5 else ''}; use a detector with a statistic "
                f"(e.g. nc or pixb) or that detector's own scorer"
            )
        stats = [float(e.statistic) for e in evidence]
        bad = [e.name for e, s in zip(evidence, stats) if not math.isfinite(s)]
        if bad:
            raise ConfigError(f"the mad scorer got a non-finite statistic for {bad[:5]}")
        index = anomaly_indices(stats)
        best = int(np.argmax(index))
        flagged = tuple(e.name for e, v in zip(evidence, index) if v > self.config.k)
        return Scores(
            scores=tuple(float(v) for v in index),
            s_max=float(index[best]),
            target=evidence[best].name,
            backdoored=bool(flagged),
            flagged=flagged,
            rule=f"some class's anomaly index > {self.config.k:g}",
        )
