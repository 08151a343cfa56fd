"""The inversion loop that a scan and a reference scan share: pool health, then one trigger per candidate class.

``invert_classes`` runs a detector once per class on the inversion set D, each class with its own random
stream (``class_generator``: the scan seed and the class name only), and measures what the detector does not:
the trigger's ASR and margin on the held-out set T (paper Eq. 5), its mean SSIM between clean and stamped T
images, and the wall time, one ``ClassEvidence`` per class.  A model and its reference are thus paired class by
class, whatever the detector consumes per class and whichever classes are scanned.

``pool_health`` classifies the whole pool (D and T) before any trigger: a non-finite logit, class scores that
collapse far below the backbone's spread (``MIN_SPREAD_RATIO``), or a CoCoOp context far larger than any word
(``MAX_CONTEXT_RATIO``) make a model unmeasurable (``PoolHealth.problems``).  A model that gives non-finite
logits on part of the pool (the tripwire breaks on images unlike its training set) is unscannable, but it is
still measured on the rest (``PoolReading.finite_part``), and a stamped image it breaks on during an inversion is left out
of that step (``ci_detectors.inspector.optimise_universal``): the verdict stays unscannable (fail closed), and
the measurement says which class the model's trigger goes to.  ``evidence_from_json`` and
``health_from_json`` read the loop's results back from a scan report or a cached reference.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import attrs
import torch

from ci_core.data.ood import OODPool
from ci_core.errors import DataError
from ci_core.learning.evaluation import mean_margin, predict_logits
from ci_core.interfaces import ClassEvidence, Detector, Progress, Stopwatch, silent
from ci_core.json_fields import JsonFields
from ci_core.models.zeroshot import CLIPClassifier
from ci_core.ssim import ssim

# The model's median spread of class scores on the pool may not fall below this share of the backbone's
# on the same images: a model whose class scores on OOD images are (near) constant cannot be inverted.
MIN_SPREAD_RATIO = 0.1
# A prompt's context vectors (ctx + pi(x), CoCoOp) may not exceed this multiple of the largest token embedding
# of the backbone on any pool image: a context far larger than any word drowns the rest of the prompt, which
# lets a model hide its prompt learner on OOD images while staying finite (see ci_attacks/tripwire.py).
# Honest tuning grows the context too: on the tiny world (lr 0.05, whose word embeddings are small) clean
# models reached 28 and WaNet's (which implants nothing) 66 times; the bound sits 15 times above that, so it
# catches a blatant wire and never an honest model; a wire below it is not caught (README, "Failing closed").
MAX_CONTEXT_RATIO = 1000.0
# A model that breaks on part of the pool is measured on the rest only while at least this share of D and of T
# is left: on fewer images a class's cost says little.
MIN_FINITE_SHARE = 0.5


def class_generator(seed: int, name: str) -> torch.Generator:
    """The random stream of one candidate class: from the scan seed and the class name only."""
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@attrs.frozen(kw_only=True)
class PoolHealth:
    """How the model's class scores behave on the whole OOD pool (D and T), before any trigger."""

    images: int
    non_finite: int  # images with at least one non-finite logit
    # Median over images of the standard deviation, across the candidate classes, of the cosine
    # similarities (logits / logit scale); None when no image gave finite logits.
    spread: float | None
    # CoCoOp: the largest context-vector norm any pool image gives the prompt, in units of the backbone's
    # largest token embedding; None for models without an image-conditioned context.
    context_ratio: float | None = None

    def problems(self, reference: "PoolHealth | None" = None) -> tuple[str, ...]:
        """Why this pool cannot be measured on the model (empty when it can)."""
        found = []
        if self.non_finite:
            found.append(f"{100 * self.non_finite / self.images:.0f}% of the OOD pool's images ({self.non_finite} of "
                         f"{self.images}) give non-finite logits")
        if self.context_ratio is not None and not self.context_ratio <= MAX_CONTEXT_RATIO:
            found.append(f"on the OOD pool the prompt's context vectors reach {self.context_ratio:.3g} times the norm "
                         f"of the backbone's largest word embedding (at most {MAX_CONTEXT_RATIO:g} expected): the "
                         "model's prompts there are not prompts its text encoder can read")
        elif reference is not None and reference.spread and self.spread is not None:
            ratio = self.spread / reference.spread
            if ratio < MIN_SPREAD_RATIO:
                found.append(f"the model's class scores on the OOD pool hardly differ between classes (median spread "
                             f"{self.spread:.3g}, {ratio:.3f} of the backbone's {reference.spread:.3g} on the same "
                             f"images; at least {MIN_SPREAD_RATIO} expected)")
        return tuple(found)


@attrs.frozen(eq=False)
class PoolReading:
    """One pass of a model over the pool (D, then T), per image: whether its logits are all finite, the spread of its
    class scores (NaN where not finite) and the largest norm of its context vectors (None for a model without an
    image-conditioned context).  The pool's health, and that of any part of it, are read off it without another
    pass (an unscannable model is read once, not once per question)."""

    inversion: int  # the first ``inversion`` images are D's
    finite: torch.Tensor  # (N,) bool
    spreads: torch.Tensor  # (N,) float
    contexts: torch.Tensor | None  # (N,) float, or None
    token_scale: float | None  # the backbone's largest token-embedding norm (the contexts' unit)

    def health(self, keep: torch.Tensor | None = None) -> PoolHealth:
        """The health of the images ``keep`` marks (all of them when None)."""
        keep = torch.ones_like(self.finite) if keep is None else keep
        finite = self.finite[keep]
        spreads = self.spreads[keep][finite]
        spread = float(spreads.median()) if len(spreads) else None
        if spread is not None and not math.isfinite(spread):
            spread = None
        context_ratio = None
        if self.contexts is not None:
            # NaN compares false everywhere: an overflowed context counts as infinitely large (JSON keeps a large
            # float)
            largest = self.contexts[keep].nan_to_num(nan=float("inf")).max()
            context_ratio = min(float(largest) / self.token_scale, 1e300)
        return PoolHealth(images=int(keep.sum()), non_finite=int((~finite).sum()), spread=spread,
                          context_ratio=context_ratio)

    def finite_part(self, pool: OODPool) -> OODPool | None:
        """The images of D and of T on which the logits are finite, or None when under ``MIN_FINITE_SHARE`` of
        either is left."""
        marks = (self.finite[:self.inversion], self.finite[self.inversion:])
        parts = (pool.inversion, pool.holdout)
        kept = [part[mark] for part, mark in zip(parts, marks)]
        if any(not len(k) or len(k) < MIN_FINITE_SHARE * len(part) for k, part in zip(kept, parts)):
            return None
        return OODPool(inversion=kept[0], holdout=kept[1], source=f"{pool.source} (the images with finite logits)")


@torch.no_grad()
def read_pool(model: CLIPClassifier, pool: OODPool, classnames: Sequence[str], batch_size: int = 64) -> PoolReading:
    images = torch.cat([pool.inversion, pool.holdout])
    scale = float(model.clip.logit_scale.exp())
    conditioned = hasattr(model, "context_norms")
    finite, spreads, contexts = [], [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(model.device)
        logits = model(batch, classnames).float().cpu()
        finite.append(torch.isfinite(logits).all(dim=1))
        spreads.append((logits / scale).std(dim=1, unbiased=False))
        if conditioned:
            contexts.append(model.context_norms(batch).cpu())
    return PoolReading(inversion=len(pool.inversion), finite=torch.cat(finite), spreads=torch.cat(spreads),
                       contexts=torch.cat(contexts) if conditioned else None,
                       token_scale=model.backbone.token_embedding_scale if conditioned else None)


def pool_health(model: CLIPClassifier, pool: OODPool, classnames: Sequence[str], batch_size: int = 64) -> PoolHealth:
    return read_pool(model, pool, classnames, batch_size).health()


def _finite_inversion(evidence_loss: float, trace: Sequence[float], tensors: dict[str, torch.Tensor]) -> bool:
    return (math.isfinite(evidence_loss) and all(math.isfinite(v) for v in trace)
            and all(bool(torch.isfinite(t).all()) for t in tensors.values()))


def invert_classes(model: CLIPClassifier, detector: Detector, pool: OODPool, classnames: Sequence[str], *, seed: int,
                   progress: Progress = silent, label: str = "",
                   transfer: CLIPClassifier | None = None) -> tuple[tuple[ClassEvidence, ...], tuple[str, ...]]:
    """Per-class evidence of ``detector`` on ``model``, and the problems that stopped it (empty if none).

    ``transfer`` (the untuned backbone as a zero-shot classifier) also reads every stamped T image: each class's
    ``transfer_margin``.  Stops at the first class whose inversion is not finite: such a model cannot be measured.
    Stamped images the model gives non-finite logits on (set aside by the detector in D, counted as missing their
    class in T) are a problem too, but the other classes are still measured.
    """
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval().requires_grad_(False)  # the scan never changes the model
    evidence: list[ClassEvidence] = []
    problems: tuple[str, ...] = ()
    broke: dict[str, tuple[int, int]] = {}  # class -> (stamped D images set aside, stamped T images broken)
    label = label or detector.name
    try:
        for index, name in enumerate(classnames):
            class_clock = Stopwatch()
            inversion = detector.invert(model=model, images=pool.inversion, classnames=tuple(classnames),
                                        target=index, generator=class_generator(seed, name))
            trace = tuple(float(v) for v in inversion.loss_trace)
            if not _finite_inversion(float(inversion.loss), trace, inversion.trigger.tensors()):
                problems = (f"the inversion for class {name!r} gave a non-finite loss or trigger: the model's outputs "
                            "or gradients on the OOD pool are not finite",)
                break
            with torch.no_grad():
                stamped = inversion.trigger.apply(pool.holdout)
                logits = predict_logits(model, stamped, classnames)
                finite = torch.isfinite(logits).all(dim=1)
                asr = float((logits.argmax(-1).eq(index) & finite).float().mean())  # a broken image misses
                margin = mean_margin(model, logits[finite], index) if bool(finite.any()) else math.nan
                similarity = float(ssim(pool.holdout, stamped).mean())
                transfer_margin = (None if transfer is None
                                   else mean_margin(transfer, predict_logits(transfer, stamped, classnames), index))
            if inversion.set_aside or not bool(finite.all()):
                broke[name] = (inversion.set_aside, int((~finite).sum()))
            statistic = None if inversion.statistic is None else float(inversion.statistic)
            if statistic is not None and not math.isfinite(statistic):
                problems = (f"the inversion for class {name!r} gave a non-finite statistic",)
                break
            evidence.append(ClassEvidence(
                name=name, asr=asr, loss=float(inversion.loss), statistic=statistic, ssim=similarity,
                seconds=class_clock.seconds, loss_trace=trace, trigger=inversion.trigger,
                margin=margin if math.isfinite(margin) else None,
                transfer_margin=transfer_margin if transfer_margin is None or math.isfinite(transfer_margin) else None,
            ))
            progress(f"{label}: class {index + 1}/{len(classnames)} {name!r}: "
                     f"ASR {asr:.3f} loss {inversion.loss:.4f} ({class_clock.seconds:.1f}s)")
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
    if broke:
        where = ", ".join(f"{name!r} ({d} + {t})" for name, (d, t) in broke.items())
        problems = (f"the model gave non-finite logits on stamped images in {len(broke)} classes' inversions "
                    f"(images of D set aside + of T counted as missing: {where}); each class was measured on the "
                    "others",) + problems
    return tuple(evidence), problems


def evidence_from_json(row: Any, where: str, error: type[Exception] = DataError) -> ClassEvidence:
    """One class's measured evidence (no trigger), as a scan report or a cached reference stores it."""
    read = JsonFields(row, where, error)
    name = read.text("name")
    read.where = f"{where}: class {name!r}"
    return ClassEvidence(name=name, asr=read.number("asr"), loss=read.number("loss"),
                         statistic=read.number("statistic", optional=True), ssim=read.number("ssim"),
                         seconds=read.number("seconds"), loss_trace=read.numbers("loss_trace", default=[]),
                         margin=read.number("margin", optional=True), seen=read.flag("seen", optional=True),
                         transfer_margin=read.number("transfer_margin", optional=True))


def health_from_json(read: JsonFields) -> PoolHealth:
    return PoolHealth(images=read.integer("images"), non_finite=read.integer("non_finite"),
                      spread=read.number("spread", optional=True),
                      context_ratio=read.number("context_ratio", optional=True))


def health_to_json(health: PoolHealth) -> dict:
    return attrs.asdict(health)
