"""``ref-outlier``: is one class far more anomalous in the model than its public backbone predicts?

The paper's scorer standardises the per-class scores within the model and flags
it when the largest reaches k = 2.  Two things make that cry wolf on clean
models (measured on the tiny world; README, "Verdicts"): with no backdoor the
largest of n standardised scores sits near 2 by chance alone (P(s_max >= 2) is
0.47 for n = 24 and 0.76 for n = 50), and the classes that stand out in a clean
model are those the untuned backbone already makes easy to reach.

So each class is judged against the reference scan (``ci_core.reference``: the
same detector, pool, seed and trigger initialisation on the backbone used as a
zero-shot classifier).  Let y_c be the model's cost of reaching class c and x_c
the backbone's, negated so that larger means easier: the detector's per-class
statistic where it reports one (NC's mask norm, Pixel Backdoor's pixel count),
otherwise the inversion's loss on the held-out images (CI).  Prompt tuning moves
every class a little, and the classes a backbone finds easy it tends to make
easier still, so the model's values are fitted on the backbone's by least
squares, y = a + b x, and each class is tested for lying far *above* that line:
its externally studentised residual

    t_c = e_c / (s_(c) sqrt(1 - h_cc)),

(e_c the residual, h_cc the leverage, s_(c) the residual standard error of the
fit without class c) follows Student's t with n - 3 degrees of freedom when no
class is special and the residuals are normal (the regression outlier test,
Cook and Weisberg 1982; Grubbs' test is its special case b = 0).  The
model-level p-value is Bonferroni's over the n candidates, p = min(1, n P(T >=
t_max)), family-wise exact enough for the one-sided maximum; the model is
flagged iff p <= alpha, and a class iff n P(T >= t_c) <= alpha.  s_max is
t_max, the predicted target its class.  The threshold thus follows n: the same
alpha asks t >= 3.90 of 24 candidates, 3.82 of 36 and 3.81 of 50 (Bonferroni over n, Student's t on
n - 3 degrees of freedom).

Why the cost and not the paper's score S (Eq. 6-7, which mixes loss and ASR):
on the development models (tiny world, seed 1: 8 clean models and controls,
16 backdoored; ``benchmarks/scorer_calibration.py``) the regression of S and
of the cost had the same power (6 of 8 implanted models at alpha = 0.01), but
S put a clean model at p = 0.027 (and one more, in a smoke run, at 0.005: a
class the backbone already favours whose ASR tuning saturates), while the
cost's smallest clean p-value was 0.16.  ASR is a bounded count that saturates
on natural targets; the loss keeps measuring.  ``compare="score"`` keeps the
regression of the base scorer's S for comparison.

alpha was pre-registered on the development seeds: a false alarm costs an
auditor as much as a miss, so the family-wise error on clean models is held
at 1%.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import numpy as np
from scipy import stats

from ci_core.errors import ConfigError
from ci_core.interfaces import ClassEvidence, Scorer, Scores

EXACT_FIT = 1e12  # the residual of a point the others fit exactly
MIN_CLASSES = 4  # a line through n points leaves n - 2 residual degrees of freedom; the test needs n - 3 >= 1


def studentized_residuals(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Externally studentised residuals of the least-squares line y = a + b x (one per point).

    Where x is constant the line is the mean of y (Grubbs' setting).  A point the
    others fit exactly (zero residual spread without it) gets +-1e12 by the sign of
    its residual (finite, so that reports stay JSON), 0 if it lies on the line too.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    design = np.column_stack([np.ones(n), x]) if np.ptp(x) > 0 else np.ones((n, 1))
    p = design.shape[1]
    if n - p - 1 < 1:
        raise ConfigError(f"the outlier test needs at least {p + 2} classes, got {n}")
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    pinv = np.linalg.pinv(design.T @ design)
    leverage = np.einsum("ij,jk,ik->i", design, pinv, design).clip(0.0, 1.0)
    sse = float(resid @ resid)
    one_minus_h = np.maximum(1.0 - leverage, 1e-12)
    sse_without = np.maximum(sse - resid**2 / one_minus_h, 0.0)
    s_without = np.sqrt(sse_without / (n - p - 1))
    scale = s_without * np.sqrt(one_minus_h)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(scale > 1e-12 * max(1.0, float(np.abs(y).max())), resid / scale,
                     np.sign(resid) * EXACT_FIT)
    return np.clip(np.nan_to_num(t, nan=0.0), -EXACT_FIT, EXACT_FIT)


def outlier_p_values(t: np.ndarray, df: int) -> np.ndarray:
    """Bonferroni-adjusted one-sided p-value of each studentised residual: min(1, n P(T_df >= t))."""
    return np.minimum(1.0, len(t) * stats.t.sf(t, df))


def _unit_interval_open(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{attribute.name} must lie strictly between 0 and 1, got {value!r}")


COMPARED = ("cost", "score")


@attrs.frozen(kw_only=True)
class ReferenceOutlierConfig:
    alpha: float = attrs.field(default=0.01, validator=_unit_interval_open)
    # What is compared with the backbone: "cost" (the negated per-class statistic, or the inversion loss where
    # the detector reports none) or "score" (the base scorer's per-class anomaly score).
    compare: str = attrs.field(default="cost", validator=attrs.validators.in_(COMPARED))
    # The per-class scorer of compare="score".  Empty: "mad" where the detector reports a per-class statistic
    # (NC's mask norm, PixB's pixel count: their own scorer), "ci" otherwise (the paper's Eq. 6-7).
    base: str = attrs.field(default="", validator=attrs.validators.instance_of(str))


class ReferenceOutlierScorer(Scorer):
    name = "ref-outlier"
    description = ("calibrated: each class's cost of reaching it against the backbone's (regression outlier "
                   "test), flagged iff the family-wise p <= alpha")
    Config = ReferenceOutlierConfig
    needs_reference = True
    min_classes = MIN_CLASSES

    def base_scorer(self, evidence: Sequence[ClassEvidence]) -> Scorer:
        from ci_core.plugins import registry

        name = self.config.base or ("mad" if all(e.statistic is not None for e in evidence) else "ci")
        base = registry().get("scorer", name)
        if base.needs_reference:
            raise ConfigError(f"{self.name}: base scorer {name!r} needs a reference itself; give a per-class scorer")
        return base.from_options()

    def compared(self, evidence: Sequence[ClassEvidence]) -> np.ndarray:
        """The per-class values the regression compares, larger = more suspicious."""
        if self.config.compare == "score":
            return np.asarray(self.base_scorer(evidence).score(evidence).scores, dtype=np.float64)
        if all(e.statistic is not None for e in evidence):
            return -np.asarray([e.statistic for e in evidence], dtype=np.float64)
        return -np.asarray([e.loss for e in evidence], dtype=np.float64)

    def score(self, evidence: Sequence[ClassEvidence], reference: Sequence[ClassEvidence] | None = None) -> Scores:
        if reference is None:
            raise ConfigError(f"the {self.name} scorer needs the reference scan of the model's backbone")
        names = [e.name for e in evidence]
        if [r.name for r in reference] != names:
            raise ConfigError(f"the reference scan's classes differ from the scan's ({len(reference)} against "
                              f"{len(names)})")
        if len(names) < MIN_CLASSES:
            raise ConfigError(f"the {self.name} scorer needs at least {MIN_CLASSES} candidate classes, got {len(names)}")
        model, backbone = self.compared(evidence), self.compared(reference)
        t = studentized_residuals(backbone, model)
        p = outlier_p_values(t, len(names) - 3)
        best = int(np.argmax(t))
        alpha = self.config.alpha
        return Scores(
            scores=tuple(float(v) for v in t), s_max=float(t[best]), target=names[best],
            backdoored=bool(p[best] <= alpha), flagged=tuple(n for n, v in zip(names, p) if v <= alpha),
            p_value=float(p[best]), rule=f"p <= {alpha:g} (Bonferroni over {len(names)} classes)",
            per_class={"p": tuple(float(v) for v in p)},
        )
