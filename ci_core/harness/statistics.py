"""Detection metrics as pure functions: ROC, AUROC, Youden's J, counts and F1.

Model level: each scanned model is one item, labelled 1 if an attack implanted a
backdoor in it, scored by the scan's s_max.  A model is flagged when its score is
at least the threshold (``s_max >= k``, as the paper's Eq. 8).

Class level (the paper's Tables 2-3): every candidate class of every scanned
model is one item; it is positive iff it is that model's backdoor target, and
predicted positive iff the scorer flagged it (its own score passes k).  So a
backdoored model whose target is flagged adds one TP, one whose target is not
flagged adds one FN, and every flagged class that is not a backdoor target
(in a clean or a backdoored model) adds one FP.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import attrs
import numpy as np


@attrs.frozen(kw_only=True)
class Roc:
    """The ROC curve: one point per distinct score, from the highest threshold (+inf: nothing flagged) down."""

    thresholds: tuple[float, ...]
    fpr: tuple[float, ...]
    tpr: tuple[float, ...]


def _labels_scores(labels: Sequence[int | bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be two lists of equal length, got {y.shape} and {s.shape}")
    return y, s


def has_both_classes(labels: Sequence[int | bool]) -> bool:
    y = np.asarray(labels, dtype=bool)
    return bool(y.any() and (~y).any())


def roc_curve(labels: Sequence[int | bool], scores: Sequence[float]) -> Roc:
    """ROC over every distinct score, flagging ``score >= threshold``; needs both labels present."""
    y, s = _labels_scores(labels, scores)
    if not has_both_classes(y):
        raise ValueError("the ROC curve needs at least one positive and one negative item")
    thresholds = np.unique(s)[::-1]
    positives, negatives = y.sum(), (~y).sum()
    tpr = [0.0] + [float((y & (s >= t)).sum() / positives) for t in thresholds]
    fpr = [0.0] + [float((~y & (s >= t)).sum() / negatives) for t in thresholds]
    return Roc(thresholds=(float("inf"),) + tuple(float(t) for t in thresholds), fpr=tuple(fpr), tpr=tuple(tpr))


def auroc(labels: Sequence[int | bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties counting 1/2."""
    y, s = _labels_scores(labels, scores)
    if not has_both_classes(y):
        raise ValueError("AUROC needs at least one positive and one negative item")
    pos, neg = s[y][:, None], s[~y][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


@attrs.frozen(kw_only=True)
class Youden:
    threshold: float  # flag iff score >= threshold
    j: float  # TPR - FPR at the threshold
    tpr: float
    fpr: float


def youden_threshold(labels: Sequence[int | bool], scores: Sequence[float]) -> Youden:
    """The ROC threshold maximising Youden's J = TPR - FPR (the highest such threshold on ties)."""
    roc = roc_curve(labels, scores)
    j = np.asarray(roc.tpr) - np.asarray(roc.fpr)
    best = int(np.argmax(j))  # first maximum = highest threshold
    return Youden(threshold=roc.thresholds[best], j=float(j[best]), tpr=roc.tpr[best], fpr=roc.fpr[best])


@attrs.frozen(kw_only=True)
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(tp=self.tp + other.tp, fp=self.fp + other.fp, fn=self.fn + other.fn, tn=self.tn + other.tn)

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def f1(self) -> float | None:
        """2TP / (2TP + FP + FN); None when there is nothing to count (no positive item, none flagged)."""
        denominator = 2 * self.tp + self.fp + self.fn
        return None if denominator == 0 else 2 * self.tp / denominator

    @property
    def tpr(self) -> float | None:
        return None if self.tp + self.fn == 0 else self.tp / (self.tp + self.fn)

    @property
    def fpr(self) -> float | None:
        return None if self.fp + self.tn == 0 else self.fp / (self.fp + self.tn)

    @property
    def accuracy(self) -> float | None:
        return None if self.total == 0 else (self.tp + self.tn) / self.total


def confusion(labels: Sequence[int | bool], predicted: Sequence[int | bool]) -> Counts:
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {y.shape} and {p.shape}")
    return Counts(tp=int((y & p).sum()), fp=int((~y & p).sum()), fn=int((y & ~p).sum()), tn=int((~y & ~p).sum()))


def class_counts(classes: Iterable[str], flagged: Iterable[str], target: str | None) -> Counts:
    """Class-level counts of one scan (see the module docstring): target None means a clean model."""
    classes, flagged = list(classes), set(flagged)
    unknown = flagged - set(classes)
    if unknown:
        raise ValueError(f"flagged classes {sorted(unknown)} are not candidate classes")
    if target is not None and target not in classes:
        raise ValueError(f"target {target!r} is not a candidate class")
    return confusion([c == target for c in classes], [c in flagged for c in classes])


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided confidence interval of a binomial proportion.

    The bounds are the beta quantiles that make each one-sided tail probability (1 - confidence) / 2;
    0 successes give a lower bound of 0, all successes an upper bound of 1.
    """
    from scipy.stats import beta

    if not (isinstance(trials, int) and trials >= 1 and isinstance(successes, int) and 0 <= successes <= trials):
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    tail = (1 - confidence) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    return low, high
