"""The scorer contract: ``check_scorer``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from ci_core.contracts.common import _Subject, _finite_number, _plain_json, check_plugin_class
from ci_core.errors import ConfigError
from ci_core.interfaces import ClassEvidence, Scorer, Scores
from ci_core.triggers import AdditiveTrigger


def _rows(names: Sequence[str], asr, loss, statistic) -> list[ClassEvidence]:
    blank = AdditiveTrigger(torch.zeros(3, 2, 2))
    return [ClassEvidence(name=n, asr=float(a), loss=float(lo), statistic=None if s is None else float(s), ssim=0.9,
                          seconds=0.1, loss_trace=(float(lo),), trigger=blank)
            for n, a, lo, s in zip(names, asr, loss, statistic)]


def _evidence_sets(n: int) -> dict[str, tuple[list[ClassEvidence], list[ClassEvidence]]]:
    """Named (evidence, reference) pairs of n classes: spread out, one class standing out, all alike, no statistic."""
    g = torch.Generator().manual_seed(0)
    names = [f"class {i}" for i in range(n)]

    def draw() -> tuple[list[float], list[float], list[float]]:  # ASR, loss, statistic
        return ((0.5 * torch.rand(n, generator=g)).tolist(), torch.rand(n, generator=g).tolist(),
                (100 + 50 * torch.rand(n, generator=g)).tolist())

    asr, loss, stat = draw()
    ref_asr, ref_loss, ref_stat = draw()
    out_asr, out_loss, out_stat = list(asr), list(loss), list(stat)
    out_asr[n // 2], out_loss[n // 2], out_stat[n // 2] = 1.0, -5.0, 1.0  # reached by all, easily, with a small trigger
    reference = _rows(names, ref_asr, ref_loss, ref_stat)
    alike = _rows(names, [0.5] * n, [1.0] * n, [120.0] * n)
    return {
        "spread": (_rows(names, asr, loss, stat), reference),
        "one class stands out": (_rows(names, out_asr, out_loss, out_stat), reference),
        "all classes alike": (alike, alike),
        "no statistic": (_rows(names, asr, loss, [None] * n), _rows(names, ref_asr, ref_loss, [None] * n)),
    }


def _check_scores(subject: _Subject, scores: Scores, names: Sequence[str], what: str) -> None:
    subject.require(isinstance(scores, Scores), f"score {what} must return Scores")
    values = scores.scores
    subject.require(isinstance(values, tuple) and len(values) == len(names) and all(_finite_number(v) for v in values),
                    f"score {what} must give one finite score per class ({len(names)}), got {values!r:.200}")
    subject.require(_finite_number(scores.s_max) and scores.s_max == max(values),
                    f"score {what}: s_max {scores.s_max!r} must be the largest score {max(values)!r}")
    subject.require(scores.target in names and values[list(names).index(scores.target)] == scores.s_max,
                    f"score {what}: the target {scores.target!r} must be the class of s_max")
    flagged = scores.flagged
    subject.require(isinstance(flagged, tuple) and set(flagged) <= set(names) and len(set(flagged)) == len(flagged),
                    f"score {what}: flagged {flagged!r} must be distinct classes of the scan")
    subject.require(isinstance(scores.backdoored, bool) and scores.backdoored == bool(flagged),
                    f"score {what}: the model is backdoored (={scores.backdoored!r}) exactly when a class is flagged "
                    f"({flagged!r})")
    subject.require(not scores.backdoored or scores.target in flagged,
                    f"score {what}: a backdoored verdict's target {scores.target!r} must be flagged")
    subject.require(scores.p_value is None or (_finite_number(scores.p_value) and 0 <= scores.p_value <= 1),
                    f"score {what}: the p-value must be None or in [0, 1], got {scores.p_value!r}")
    subject.require(isinstance(scores.rule, str) and scores.rule.strip(), f"score {what}: the rule is empty")
    subject.require(_plain_json(scores), f"score {what}: the scores are not plain JSON")


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def check_scorer(cls: type[Scorer], *, options: Mapping[str, Any] | None = None) -> None:
    """A scorer turns per-class evidence into scores and a verdict.

    On synthetic evidence of ``max(8, min_classes)`` classes (spread out; one class standing out; all
    alike; and without a statistic, which it may refuse with a ConfigError), with a reference scan of
    the same classes where it ``needs_reference``:

    * one finite score per class; s_max the largest, target its class; flagged distinct classes of the
      scan; backdoored exactly when a class is flagged, the target among them; p_value None or in [0, 1];
      a rule in words; plain JSON;
    * the same scores per class name, verdict, flagged set and p-value when the classes come in another
      order (evidence and reference permuted together), and on a second call;
    * a ConfigError for what it cannot score: no classes, fewer than ``min_classes``, no reference where it
      needs one.
    """
    subject = _Subject("scorer", cls)
    check_plugin_class("scorer", cls)
    subject.require(isinstance(cls.min_classes, int) and cls.min_classes >= 1, "min_classes must be at least 1")
    subject.require(isinstance(cls.needs_reference, bool), "needs_reference must be True or False")
    scorer = cls.from_options(options, preset="tiny")
    n = max(8, cls.min_classes)
    scored = 0
    for label, (evidence, reference) in _evidence_sets(n).items():
        ref = reference if cls.needs_reference else None
        names = [e.name for e in evidence]
        try:
            scores = scorer.score(evidence, ref)
        except ConfigError:
            subject.require(label == "no statistic", f"it refused to score evidence with {label} (ConfigError)")
            continue
        scored += 1
        _check_scores(subject, scores, names, f"(evidence: {label})")
        subject.require(scorer.score(evidence, ref) == scores, f"score (evidence: {label}) changed on a second call")
        order = list(range(n))[::2] + list(range(n))[1::2]
        permuted = scorer.score([evidence[i] for i in order], [ref[i] for i in order] if ref else None)
        _check_scores(subject, permuted, [names[i] for i in order], f"(evidence: {label}, classes reordered)")
        by_name = dict(zip([names[i] for i in order], permuted.scores))
        subject.require(all(_close(by_name[name], value) for name, value in zip(names, scores.scores))
                        and permuted.backdoored == scores.backdoored and set(permuted.flagged) == set(scores.flagged)
                        and _close(permuted.p_value, scores.p_value),
                        f"score (evidence: {label}) depends on the order of the classes")
    subject.require(scored >= 3, "it must score evidence that has a statistic")
    evidence, reference = _evidence_sets(n)["spread"]
    ref = reference if cls.needs_reference else None
    subject.refuses(ConfigError, lambda: scorer.score([], [] if ref else None), "no classes must be refused")
    few = cls.min_classes - 1
    if few >= 1:
        subject.refuses(ConfigError, lambda: scorer.score(evidence[:few], ref[:few] if ref else None),
                        f"{few} classes, fewer than its min_classes, must be refused")
    if cls.needs_reference:
        subject.refuses(ConfigError, lambda: scorer.score(evidence, None), "it needs a reference: none must be refused")
