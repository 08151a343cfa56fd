"""One model scan: check that the pool can be measured, invert a trigger per candidate class, measure, score.

The loop is the same for every detector: the detector only reconstructs a
trigger on the inversion set D; the core measures each trigger's ASR on the
held-out set T (paper Eq. 5), its mean SSIM between clean and triggered T
images, and the wall time, then hands the evidence to the scorers.

Fail closed.  The scanned model comes from the party being audited, so a scan
that cannot measure never says "clean": before any inversion the model
classifies the whole pool, and if any image gives a non-finite logit, or the
model's class scores on the pool collapse far below the spread its public
backbone shows on the same images (``PoolHealth``), the verdict is
``unscannable``; so is a class whose inversion returns a non-finite loss or
trigger.  ``unscannable`` is a verdict of its own, never folded into clean.
A model that breaks on part of the pool, or on some stamped images, is still
measured on the rest (``ci_core.scanning.inversion``): where every class was
measured, the deciding scorer's reading is the scan's ``suspect``, the class its
trigger most likely goes to, beside the unscannable verdict.

Each class draws its trigger initialisation and batch order from its own
generator, seeded by the scan seed and the class name (``class_generator``): a
model and its reference scan (``ci_core.scanning.reference``) are thus paired class by
class, whatever the detector consumes per class and whichever classes are
scanned.  That loop (pool health, inversion, measurement) is
``ci_core.scanning.inversion``'s, shared with the reference scan; this module adds the
scorers and the verdict.
"""

from __future__ import annotations

from typing import Sequence

import attrs

from ci_core.data.ood import OODPool
from ci_core.errors import ConfigError
from ci_core.interfaces import ClassEvidence, Detector, Progress, Scorer, Scores, Stopwatch, silent, to_json
from ci_core.scanning.inversion import PoolHealth, PoolReading, invert_classes, read_pool
from ci_core.models.zeroshot import CLIPClassifier, ZeroShotCLIP
from ci_core.scanning.reference import ReferenceScan
from ci_core.scanning.seen import mark_seen

CLEAN, BACKDOORED, UNSCANNABLE = "clean", "backdoored", "unscannable"
# The kind of output folder write_scan makes (ci_core.pages.scan_output, ci_core.files.publishing).
SCAN_OUTPUT = "scan"


@attrs.frozen(kw_only=True)
class ScorerVerdict:
    """One scorer's reading of a scan's evidence."""

    scorer: str
    config: dict
    scores: Scores


def apply_scorer(scorer: Scorer, evidence: Sequence[ClassEvidence],
                 reference: Sequence[ClassEvidence] | None) -> ScorerVerdict:
    """``scorer``'s reading of ``evidence``; the reference rows reach only a scorer that ``needs_reference``."""
    scorer.check_inputs(classes=len(evidence), reference=reference is not None)
    scores = scorer.score(evidence, reference if scorer.needs_reference else None)
    return ScorerVerdict(scorer=scorer.name, config=to_json(scorer.config), scores=scores)


@attrs.frozen(kw_only=True)
class ScanResult:
    detector: str
    detector_config: dict
    classes: tuple[ClassEvidence, ...]
    health: PoolHealth
    problems: tuple[str, ...]  # why the model could not be measured; empty when it could
    decision: ScorerVerdict | None  # the scorer whose verdict counts; None when unscannable
    # Unscannable, but every class measured on the images the model did not break on: the deciding scorer's
    # reading of that evidence, naming the class a trigger most likely goes to (never a verdict of clean).
    suspect: ScorerVerdict | None = None
    others: tuple[ScorerVerdict, ...] = ()  # further scorers, reported beside it
    reference: ReferenceScan | None = None
    seconds: float

    @property
    def verdict(self) -> str:
        if self.problems or self.decision is None:
            return UNSCANNABLE
        return BACKDOORED if self.decision.scores.backdoored else CLEAN

    @property
    def scores(self) -> Scores:
        """The deciding scorer's scores (a scannable result only)."""
        if self.decision is None:
            raise ConfigError(f"the scan could not measure the model ({'; '.join(self.problems)}), so it has no scores")
        return self.decision.scores

    def summary(self) -> dict:
        """The verdict in one flat row: the deciding scorer's figures, then those of the first scorer beside it
        (the detector's own, the paper's), as the demo and the benchmark record them."""
        decided = self.decision.scores if self.decision is not None else None
        # unscannable: the class its measurement on the images it did not break on points to, if any
        named = decided or (self.suspect.scores if self.suspect is not None else None)
        beside = self.others[0] if self.others else None
        return {
            "verdict": self.verdict, "backdoored": self.verdict != CLEAN,
            "scorer": self.decision.scorer if self.decision is not None else None,
            "s_max": decided.s_max if decided else None, "p_value": decided.p_value if decided else None,
            "predicted_target": named.target if named else None,
            "flagged": list(decided.flagged) if decided else [],
            "paper_scorer": beside.scorer if beside else None,
            "paper_s_max": beside.scores.s_max if beside else None,
            "paper_flagged": beside.scores.backdoored if beside else None,
        }


def check_scorers(scorers: Sequence[Scorer], *, classes: int, reference: bool) -> None:
    """Every scorer can score ``classes`` candidate classes with (or without) a reference: checked before any work
    (``Scorer.check_inputs``)."""
    for scorer in scorers:
        scorer.check_inputs(classes=classes, reference=reference)


def stored_problems(meta: dict) -> tuple[str, ...]:
    """What the loaded model's metadata says makes it unmeasurable: stored tensors holding NaN or infinity
    (``load_bundle`` and ``delivery.open_model`` count them), which a scan must not read as clean even where they
    leave the outputs finite."""
    bad = meta.get("non_finite_tensors") or {}
    if not bad:
        return ()
    names = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:5])
    return (f"{len(bad)} stored tensor(s) hold NaN or infinite values: {names}{' ...' if len(bad) > 5 else ''}",)


def scan(model: CLIPClassifier, detector: Detector, scorer: Scorer, pool: OODPool, classnames: Sequence[str], *,
         seed: int = 0, reference: ReferenceScan | None = None, also: Sequence[Scorer] = (),
         known_problems: Sequence[str] = (), base_classes: Sequence[str] | None = None,
         progress: Progress = silent) -> ScanResult:
    """Run ``detector`` for every class of ``classnames``; ``scorer`` decides, ``also`` are reported beside it.

    ``reference`` is the reference scan of the same classes, pool, seed and detector (needed by
    scorers with ``needs_reference``; see ``ci_core.scanning.reference.run_reference``).  ``known_problems`` are
    reasons found before the scan that the model cannot be measured (``stored_problems``): then nothing is
    inverted and the verdict is unscannable.  ``base_classes`` (the model's bundle's: the classes it was tuned
    on) marks each class's evidence as seen or not.
    """
    clock = Stopwatch()
    classnames = tuple(classnames)
    if reference is not None and reference.classnames != classnames:
        raise ConfigError("the reference scan covers other classes than the scan "
                          f"({len(reference.classnames)} against {len(classnames)})")
    check_scorers((scorer, *also), classes=len(classnames), reference=reference is not None)
    reading = read_pool(model, pool, classnames)
    health = reading.health()
    reference_health = reference.health if reference is not None else None
    problems = tuple(known_problems) + health.problems(reference_health)
    measured = pool if not problems else _measurable_rest(pool, reading, reference_health, known_problems)
    evidence: tuple[ClassEvidence, ...] = ()
    if problems:
        progress(f"unscannable: {'; '.join(problems)}" + ("; measuring it on the images with finite logits"
                                                           if measured is not None else ""))
    if measured is not None:
        # With a reference, the untuned backbone also reads every stamped held-out image (transfer_margin).
        transfer = (ZeroShotCLIP(model.backbone, reference.spec["template"], own_visual=False).eval()
                    if reference is not None else None)
        evidence, found = invert_classes(model, detector, measured, classnames, seed=seed, progress=progress,
                                         transfer=transfer)
        problems += found
        evidence = mark_seen(evidence, base_classes)
    decision, others, suspect = None, (), None
    rows = reference.classes if reference is not None else None
    if not problems:
        decision = apply_scorer(scorer, evidence, rows)
        others = tuple(apply_scorer(s, evidence, rows) for s in also)
    elif len(evidence) == len(classnames):
        suspect = apply_scorer(scorer, evidence, rows)
    return ScanResult(detector=detector.name, detector_config=to_json(detector.config), classes=evidence,
                      health=health, problems=problems, decision=decision, others=others, suspect=suspect,
                      reference=reference, seconds=clock.seconds)


def _measurable_rest(pool: OODPool, reading: PoolReading, reference_health: PoolHealth | None,
                     known_problems) -> OODPool | None:
    """The part of ``pool`` an unscannable model can still be measured on: its images with finite logits, where
    those are the only problem and the rest is healthy; None otherwise."""
    if known_problems or bool(reading.finite.all()):
        return None
    part = reading.finite_part(pool)
    if part is None or reading.health(reading.finite).problems(reference_health):
        return None
    return part
