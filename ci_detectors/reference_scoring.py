"""``ref-outlier``: is one class far more anomalous in the model than its public backbone predicts?

The paper's scorer standardises the per-class scores within the model and flags
it when the largest reaches k = 2.  Two things make that cry wolf on clean
models (measured on the tiny world; README, "Verdicts"): with no backdoor the
largest of n standardised scores sits near 2 by chance alone (P(s_max >= 2) is
0.47 for n = 24 and 0.76 for n = 50), and the classes that stand out in a clean
model are those the untuned backbone already makes easy to reach.

So each class is judged against the reference scan (``ci_core.scanning.reference``: the
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
t_max, the predicted target its class.  The threshold thus follows n: alpha =
0.05 asks t >= 3.21 of 24 candidates, 3.23 of 36 and 3.27 of 50 (Bonferroni over n, Student's t on
n - 3 degrees of freedom).

Prompt tuning also makes the classes it was tuned on (the model's base
classes, ``ClassEvidence.seen``) easier to reach as a group, a shift the
backbone's line does not have: left in the residuals, it swells their spread
and hides a target among them.  So where the candidates hold at least three
seen and three unseen classes the fit has a second intercept for the seen
ones, y = a + b x + d seen, and t follows Student's t on n - 4 degrees of
freedom (``seen_intercept``, the third freeze, docs/verdicts.md: on the
development models it flagged no clean model where the line flagged one, and
ranked the models better, AUROC 0.978 against 0.940).

Why the cost and not the paper's score S (Eq. 6-7, which mixes loss and ASR):
on the development models (tiny world, seed 1: 8 clean models and controls,
16 backdoored; ``benchmarks/scorer_calibration.py``) the regression of S and
of the cost had the same power (6 of 8 implanted models at alpha = 0.01), but
S put a clean model at p = 0.027 (and one more, in a smoke run, at 0.005: a
class the backbone already favours whose ASR tuning saturates), while the
cost's smallest clean p-value was 0.16.  ASR is a bounded count that saturates
on natural targets; the loss keeps measuring.  ``compare="score"`` keeps the
regression of the base scorer's S for comparison.

alpha = 0.05 is the false-positive rate an auditor was promised (issue 21's
aim), frozen before the confirmation models it was read on (docs/verdicts.md,
"A second freeze").  The first freeze held it at 0.01; on clean prompt-tuned
models the Student-t null proved conservative (4 of 21 development clean
p-values below 0.5, 10.5 expected), so 0.01 cost power for an FPR far below
the aim.

With a variance prior (``variance_prior``: ``ci-bench prior`` fits one from clean tuned models scanned in the same
setting; ``ci_core.scanning.variance_prior``) each s_(c)^2 is pooled with the prior's, (d0 s0^2 + d s_(c)^2) / (d0
+ d), and t follows Student's t on d0 + d degrees of freedom: the spread is no longer estimated from the model's
own 12-36 classes alone, which a backdoor's cluster of moved classes swells (docs/verdicts.md, "A sixth freeze").

Measured options (docs/verdicts.md, issue 21), none the default: ``compare``
may name the finished trigger's held-out margin or its logit ASR instead of
the cost, or several joined by '+' (one family-wise test, Bonferroni over the
statistics); ``fit="robust"`` replaces least squares by a Theil-Sen line with
residuals in MADs and a Monte Carlo null, which a cluster of classes the
trigger also moves cannot mask.  On the development models neither beat the
least-squares cost over all classes.

``compare="transfer"`` asks another question of the same scan: not how cheap
the class is in the model against the backbone's own trigger, but whether the
backbone answers to the *model's* trigger.  x is the untuned backbone's margin
towards the class under the model's finished trigger, y the model's margin
under it (both on T, ``ClassEvidence.transfer_margin`` and ``margin``); a
class far above the fit has a trigger the model alone answers to.  With
``cost+transfer`` (one test over both, Bonferroni over the two) it caught
development Blended backdoors the l-inf inversion cannot tell from the
backbone by their cost; frozen as the fourth verdict, on its confirmation it
flagged the same models as the cost alone, so it stays an option
(docs/verdicts.md, "transfer margin").
"""

from __future__ import annotations

import functools
from typing import Sequence

import attrs
import numpy as np
from scipy import stats

from ci_core.errors import ConfigError, PluginError
from ci_core.interfaces import ClassEvidence, Scorer, Scores
from ci_core.scanning.seen import line_design, seen_column
from ci_core.scanning.variance_prior import VariancePrior
from ci_detectors.mad import MADScorer
from ci_detectors.scoring import CIScorer

EXACT_FIT = 1e12  # the residual of a point the others fit exactly
MIN_CLASSES = 4  # a line through n points leaves n - 2 residual degrees of freedom; the test needs n - 3 >= 1


def studentized_residuals(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Externally studentised residuals of the least-squares line y = a + b x (one per point).

    Where x is constant the line is the mean of y (Grubbs' setting).  A point the
    others fit exactly (zero residual spread without it) gets +-1e12 by the sign of
    its residual (finite, so that reports stay JSON), 0 if it lies on the line too.
    """
    return studentized_residuals_on(line_design(x), y)


def studentized_residuals_on(design: np.ndarray, y: Sequence[float], prior: VariancePrior | None = None) -> np.ndarray:
    """Externally studentised residuals of the least-squares fit of y on the columns of ``design`` (n x p): each
    follows Student's t with ``residual_df(n, p, prior)`` degrees of freedom when no point is special (n - p - 1
    without a prior).  With a variance ``prior`` each leave-one-out variance is moderated by it
    (``ci_core.scanning.variance_prior``).  Exact fits as above."""
    design = np.asarray(design, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, p = design.shape
    if n - p - 1 < 1:
        raise ConfigError(f"the outlier test needs at least {p + 2} classes, got {n}")
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    pinv = np.linalg.pinv(design.T @ design)
    leverage = np.einsum("ij,jk,ik->i", design, pinv, design).clip(0.0, 1.0)
    sse = float(resid @ resid)
    one_minus_h = np.maximum(1.0 - leverage, 1e-12)
    sse_without = np.maximum(sse - resid**2 / one_minus_h, 0.0)
    variance_without = sse_without / (n - p - 1)
    if prior is not None:
        variance_without = prior.moderate(variance_without, n - p - 1)[0]
    s_without = np.sqrt(variance_without)
    scale = s_without * np.sqrt(one_minus_h)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(scale > 1e-12 * max(1.0, float(np.abs(y).max())), resid / scale,
                     np.sign(resid) * EXACT_FIT)
    return np.clip(np.nan_to_num(t, nan=0.0), -EXACT_FIT, EXACT_FIT)


def residual_df(n: int, p: int, prior: VariancePrior | None = None) -> float:
    """Degrees of freedom of the externally studentised residuals of a fit of n points on p columns (infinite: a
    known variance)."""
    return float(n - p - 1) if prior is None else prior.pooled_df(n - p - 1)


def residual_variance(design: np.ndarray, y: Sequence[float]) -> tuple[float, int]:
    """(the residual variance of the least-squares fit of y on ``design``, its degrees of freedom n - p): what a
    variance prior is fitted on."""
    design = np.asarray(design, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, p = design.shape
    if n - p < 1:
        raise ConfigError(f"a residual variance needs more classes than the fit's {p} columns, got {n}")
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    return float(resid @ resid) / (n - p), n - p


def outlier_p_values(t: np.ndarray, df: int) -> np.ndarray:
    """Bonferroni-adjusted one-sided p-value of each studentised residual: min(1, n P(T_df >= t))."""
    return np.minimum(1.0, len(t) * stats.t.sf(t, df))


# --------------------------------------------------------------------------- the robust fit

MAD_TO_SD = 1.482602218505602  # 1 / Phi^-1(3/4): the MAD of a normal sample estimates its sd times this
NULL_DRAWS = 20_000  # Monte Carlo draws of the robust null: p resolves down to 1 / 20001 = 5e-5
NULL_SEED = 20261206  # fixed, so that a verdict is the same on every run


def _pair_index(n: int) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(n, k=1)
    return i, j


def robust_residuals(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residuals of the Theil-Sen line (median pairwise slope, median intercept) in units of their MAD, centred
    on their median; rows of ``y`` are fitted one by one (x shared).  Where x is constant the line is flat.

    Why robust: a backdoor rarely moves its target alone.  On the tiny world SIBA's and BadCLIP-adaptive's
    triggers make every class of the target's colour easier to reach, and least squares lets that cluster pull
    the line and swell the residual spread, so the target's studentised residual stays near 2 (masking).  The
    median slope and the MAD ignore up to half the classes."""
    x = np.asarray(x, dtype=np.float64)
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    i, j = _pair_index(x.shape[0])
    dx = x[j] - x[i]
    keep = dx != 0
    if keep.any():
        slope = np.median((y[:, j[keep]] - y[:, i[keep]]) / dx[keep], axis=1)
    else:
        slope = np.zeros(y.shape[0])
    resid = y - slope[:, None] * x[None, :]
    resid = resid - np.median(resid, axis=1, keepdims=True)
    scale = MAD_TO_SD * np.median(np.abs(resid), axis=1, keepdims=True)
    tiny = 1e-12 * np.maximum(1.0, np.abs(y).max(axis=1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scale > tiny, resid / scale, np.sign(resid) * EXACT_FIT)
    return np.clip(np.nan_to_num(z, nan=0.0), -EXACT_FIT, EXACT_FIT)


def robust_null(x: np.ndarray, draws: int = NULL_DRAWS, seed: int = NULL_SEED) -> np.ndarray:
    """The largest robust residual of n classes with no outlier: normal noise around a line on the observed x
    (the statistic does not depend on the line or the noise's scale), ``draws`` times, sorted."""
    return _robust_null(np.asarray(x, dtype=np.float64).tobytes(), draws, seed)


@functools.lru_cache(maxsize=64)  # a report scores the same reference for many scans
def _robust_null(x_bytes: bytes, draws: int, seed: int) -> np.ndarray:
    x = np.frombuffer(x_bytes, dtype=np.float64)
    rng = np.random.default_rng(seed)
    maxima = []
    for start in range(0, draws, 1000):
        noise = rng.standard_normal((min(1000, draws - start), len(x)))
        maxima.append(robust_residuals(x, noise).max(axis=1))
    return np.sort(np.concatenate(maxima))


def robust_p_values(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Family-wise p-value of each class's robust residual: the share of null draws whose largest residual over
    all n classes reaches it ((k + 1) / (draws + 1), so never 0)."""
    null = robust_null(x)
    above = len(null) - np.searchsorted(null, z, side="left")
    return (above + 1) / (len(null) + 1)


def logit_asr(asr: np.ndarray, images: int = 64) -> np.ndarray:
    """log((k + 1/2) / (n - k + 1/2)) of an ASR k/n: finite at 0 and 1, spreading the ends that ASR squeezes.
    ``images`` only sets how far the ends reach; the regression is unchanged by the scale of its input."""
    hits = asr * images
    return np.log((hits + 0.5) / (images - hits + 0.5))


def _unit_interval_open(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{attribute.name} must lie strictly between 0 and 1, got {value!r}")


# What can be compared with the backbone, each larger = more suspicious:
#   cost   the negated per-class statistic (NC's mask norm, PixB's pixel count), or the negated inversion loss
#          (CI: the margin loss averaged over the optimisation);
#   margin the finished trigger's mean margin on the held-out images T (ClassEvidence.margin);
#   asr    the logit of the finished trigger's ASR on T (continuity-corrected);
#   score  the base scorer's per-class anomaly score (the paper's S for CI);
#   transfer  the finished trigger's margin on the model against the backbone's margin under the *same* trigger
#          (ClassEvidence.transfer_margin): the line is fitted on the scan's own evidence, not on the reference
#          scan's, and a class lies above it where the model answers to its trigger far more than the backbone
#          does.  A trigger the backbone shares is a natural feature; one the model alone answers to is implanted.
COMPARED = ("cost", "margin", "asr", "score", "transfer")
FITS = ("ols", "robust")


def _compared(instance, attribute, value) -> None:
    parts = value.split("+") if isinstance(value, str) else []
    if not parts or any(p not in COMPARED for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"{attribute.name} must be one of {', '.join(COMPARED)}, or several joined by '+' "
                         f"(e.g. cost+margin), got {value!r}")


def _to_prior(value):
    """A VariancePrior, or its JSON form (a scan report's scorer config read back)."""
    if value is None or isinstance(value, VariancePrior):
        return value
    if isinstance(value, dict):
        return VariancePrior.from_json(value, "variance_prior")
    raise ValueError(f"variance_prior must be a variance prior (ci-bench prior), got {value!r}")


@attrs.frozen(kw_only=True)
class ReferenceOutlierConfig:
    alpha: float = attrs.field(default=0.05, validator=_unit_interval_open)  # docs/verdicts.md, the second freeze
    # What is compared with the backbone (see COMPARED); several joined by '+' are tested together, the family-wise
    # p-value Bonferroni-corrected over the classes and the statistics.
    compare: str = attrs.field(default="cost", validator=_compared)
    # How each class is judged against the line: "ols" (least squares, externally studentised residuals,
    # Student's t with Bonferroni over the classes) or "robust" (Theil-Sen line, residuals in MADs, the largest
    # one's p-value from a Monte Carlo null of the same n and reference values; see robust_residuals).
    fit: str = attrs.field(default="ols", validator=attrs.validators.in_(FITS))
    # The per-class scorer of compare="score".  Empty: "mad" where the detector reports a per-class statistic
    # (NC's mask norm, PixB's pixel count: their own scorer), "ci" otherwise (the paper's Eq. 6-7).
    base: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    # A separate intercept for the classes the model was tuned on (ClassEvidence.seen), where the candidates hold
    # at least seen.MIN_GROUP of each: tuning makes its own classes easier to reach as a group, a shift the backbone's
    # line does not have (docs/verdicts.md, "A third freeze").  Least squares only.
    seen_intercept: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    # How far clean tuned models of this scan's setting scatter around the line (ci_core.scanning.variance_prior):
    # each class's residual variance is moderated by it (docs/verdicts.md, "A sixth freeze").  None: the model's
    # own classes alone.  Least squares and one statistic only.
    variance_prior: VariancePrior | None = attrs.field(default=None, converter=_to_prior)

    def __attrs_post_init__(self):
        if self.fit == "robust" and self.seen_intercept:
            raise ValueError("fit='robust' has no seen-class intercept (its Monte Carlo null is of the line alone); "
                             "give seen_intercept=false with it")
        if self.variance_prior is not None and (self.fit != "ols" or "+" in self.compare):
            raise ValueError(f"variance_prior moderates the least-squares residuals of one statistic; got fit="
                             f"{self.fit!r}, compare={self.compare!r}")

    def statistic(self) -> dict:
        """What a variance prior must have been fitted on to be this config's (``variance_prior.prior_setting``)."""
        return {"scorer": "ref-outlier", "compare": self.compare, "fit": self.fit, "seen_intercept": self.seen_intercept,
                "base": self.base}


def _per_class_scorer(name: str, owner: str) -> Scorer:
    """The scorer ``name`` with its default config: this package's own ones directly, another from the registry."""
    own = {cls.name: cls for cls in (CIScorer, MADScorer)}
    if name in own:
        cls = own[name]
    else:
        from ci_core.plugins import registry

        try:
            cls = registry().get("scorer", name)
        except PluginError as exc:  # a bad option value: the same kind of error as any other option's
            raise ConfigError(f"{owner} options: base: {exc}") from None
    if cls.needs_reference:
        raise ConfigError(f"{owner} options: base: scorer {name!r} needs a reference itself; give a per-class "
                          "scorer")
    return cls.from_options()


class ReferenceOutlierScorer(Scorer):
    name = "ref-outlier"
    description = ("calibrated: each class's cost of reaching it against the backbone's (regression outlier "
                   "test), flagged iff the family-wise p <= alpha")
    Config = ReferenceOutlierConfig
    needs_reference = True
    min_classes = MIN_CLASSES

    def __init__(self, config: ReferenceOutlierConfig | None = None):
        super().__init__(config)
        # A named base scorer is found once, here: scoring never looks a plugin up.
        self._base = _per_class_scorer(self.config.base, self.name) if self.config.base else None

    def base_scorer(self, evidence: Sequence[ClassEvidence]) -> Scorer:
        """The per-class scorer of compare="score": the configured one, else "mad" where every class has a
        statistic and "ci" otherwise."""
        if self._base is not None:
            return self._base
        return (MADScorer if all(e.statistic is not None for e in evidence) else CIScorer).from_options()

    def compared(self, evidence: Sequence[ClassEvidence], what: str) -> np.ndarray:
        """The per-class values of statistic ``what`` (see COMPARED), larger = more suspicious."""
        if what == "score":
            return np.asarray(self.base_scorer(evidence).score(evidence).scores, dtype=np.float64)
        if what == "margin":
            if any(e.margin is None for e in evidence):
                raise ConfigError(f"{self.name}: compare=margin needs each class's held-out margin, which scans and "
                                  "references of clip-inspector before 0.4 did not record; scan again")
            return np.asarray([e.margin for e in evidence], dtype=np.float64)
        if what == "asr":
            return logit_asr(np.asarray([e.asr for e in evidence], dtype=np.float64))
        if all(e.statistic is not None for e in evidence):
            return -np.asarray([e.statistic for e in evidence], dtype=np.float64)
        return -np.asarray([e.loss for e in evidence], dtype=np.float64)

    def against(self, evidence: Sequence[ClassEvidence], reference: Sequence[ClassEvidence],
                what: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of statistic ``what``: the backbone's values and the model's, both larger = easier to reach."""
        if what != "transfer":
            return self.compared(reference, what), self.compared(evidence, what)
        if any(e.transfer_margin is None or e.margin is None for e in evidence):
            raise ConfigError(f"{self.name}: compare=transfer needs each class's transfer margin (the backbone's "
                              "margin under the model's trigger), which a scan records only with a reference and "
                              "since the field exists; scan again")
        return (np.asarray([e.transfer_margin for e in evidence], dtype=np.float64),
                np.asarray([e.margin for e in evidence], dtype=np.float64))

    def residual_variance(self, evidence: Sequence[ClassEvidence],
                          reference: Sequence[ClassEvidence]) -> tuple[float, int]:
        """(residual variance, degrees of freedom) of this config's least-squares fit of a scan on its reference: a
        clean tuned model's is one sample of what a variance prior is fitted on (``ci-bench prior``)."""
        if self.config.fit != "ols" or "+" in self.config.compare:
            raise ConfigError(f"{self.name}: a variance prior is fitted for one statistic by least squares; got fit="
                              f"{self.config.fit!r}, compare={self.config.compare!r}")
        self.check_inputs(classes=len(evidence), reference=True)
        seen = seen_column(evidence) if self.config.seen_intercept else None
        x, y = self.against(evidence, reference, self.config.compare)
        return residual_variance(line_design(x, seen), y)

    def score(self, evidence: Sequence[ClassEvidence], reference: Sequence[ClassEvidence] | None = None) -> Scores:
        self.check_inputs(classes=len(evidence), reference=reference is not None)
        names = [e.name for e in evidence]
        if [r.name for r in reference] != names:
            raise ConfigError(f"the reference scan's classes differ from the scan's ({len(reference)} against "
                              f"{len(names)})")
        statistics = self.config.compare.split("+")
        per_class: dict[str, tuple[float, ...]] = {}
        if self.config.fit == "ols":
            # Every test has the same n and degrees of freedom, so a class's smallest p-value over the statistics
            # is that of its largest residual: its score is that t; Bonferroni over k statistics multiplies by k.
            seen = seen_column(evidence) if self.config.seen_intercept else None
            pairs = [self.against(evidence, reference, what) for what in statistics]
            prior = self.config.variance_prior
            t = np.max([studentized_residuals_on(line_design(x, seen), y, prior) for x, y in pairs], axis=0)
            df = residual_df(len(names), 2 + (seen is not None), prior)  # n - 3 for the line, as before
            p = outlier_p_values(t, df)
            # Each class's own p before the correction over the classes: what a test pairing this scan's classes
            # with another scan's reads (ci_core.scanning.combined.paired_verdict).
            per_class["p_class"] = tuple(float(v) for v in np.minimum(1.0, len(statistics) * stats.t.sf(t, df)))
            over = (f"Bonferroni over {len(names)} classes" + (", seen classes' own intercept" if seen is not None
                                                                 else "")
                    + (f", residual variance moderated by the prior of {prior.models} clean tuned models"
                       if prior is not None else ""))
        else:
            # Each statistic's null depends on its reference values: per class the smallest p over statistics.
            fits = []
            for what in statistics:
                x, y = self.against(evidence, reference, what)
                z = robust_residuals(x, y)[0]
                fits.append((z, robust_p_values(x, z)))
            which = np.argmin([p for _, p in fits], axis=0)
            t = np.array([fits[k][0][c] for c, k in enumerate(which)])
            p = np.array([fits[k][1][c] for c, k in enumerate(which)])
            over = f"the largest of {len(names)} robust residuals, Monte Carlo"
        p = np.minimum(1.0, len(statistics) * p)
        best = int(np.argmin(p - 1e-12 * t))  # the smallest p; among equal ones the largest residual
        alpha = self.config.alpha
        over += f" x {len(statistics)} statistics (Bonferroni)" if len(statistics) > 1 and self.config.fit != "ols" \
            else f" x {len(statistics)} statistics" if len(statistics) > 1 else ""
        return Scores(
            scores=tuple(float(v) for v in t), s_max=float(t[best]), target=names[best],
            backdoored=bool(p[best] <= alpha), flagged=tuple(n for n, v in zip(names, p) if v <= alpha),
            p_value=float(p[best]), rule=f"p <= {alpha:g} ({over})",
            per_class={"p": tuple(float(v) for v in p), **per_class},
        )
