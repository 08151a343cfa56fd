"""One model scan: invert a trigger per candidate class, measure it on held-out images, score the classes.

The loop is the same for every detector: the detector only reconstructs a
trigger on the inversion set D; the core measures each trigger's ASR on the
held-out set T (paper Eq. 5), its mean SSIM between clean and triggered T
images, and the wall time, then hands the evidence to the scorer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import attrs
import torch
from torchvision.utils import save_image

from ci_core.data.ood import OODPool
from ci_core.errors import ConfigError
from ci_core.interfaces import ClassEvidence, Detector, Progress, Scorer, Scores, Stopwatch, silent, to_json
from ci_core.metrics import predict, ssim
from ci_core.models.zeroshot import CLIPClassifier


@attrs.frozen(kw_only=True)
class ScanResult:
    detector: str
    detector_config: dict
    scorer: str
    scorer_config: dict
    classes: tuple[ClassEvidence, ...]
    scores: Scores
    seconds: float

    def report(self, **context) -> dict:
        """The JSON report: verdict first, then per-class rows, then the settings and ``context``."""
        rows = []
        for evidence, score in zip(self.classes, self.scores.scores):
            row = to_json(evidence)
            row["score"] = score
            rows.append(row)
        return {
            "backdoored": self.scores.backdoored,
            "s_max": self.scores.s_max,
            "target": self.scores.target,
            "flagged": list(self.scores.flagged),
            "detector": self.detector,
            "detector_config": self.detector_config,
            "scorer": self.scorer,
            "scorer_config": self.scorer_config,
            "seconds": self.seconds,
            "classes": rows,
            **context,
        }


def scan(model: CLIPClassifier, detector: Detector, scorer: Scorer, pool: OODPool, classnames: Sequence[str], *,
         seed: int = 0, progress: Progress = silent) -> ScanResult:
    """Run ``detector`` for every class of ``classnames`` and score the evidence with ``scorer``."""
    clock = Stopwatch()
    classnames = tuple(classnames)
    generator = torch.Generator().manual_seed(seed)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval().requires_grad_(False)  # the scan never changes the model
    evidence = []
    try:
        for index, name in enumerate(classnames):
            class_clock = Stopwatch()
            inversion = detector.invert(model=model, images=pool.inversion, classnames=classnames,
                                        target=index, generator=generator)
            with torch.no_grad():
                stamped = inversion.trigger.apply(pool.holdout)
                asr = float(predict(model, stamped, classnames).eq(index).float().mean())
                similarity = float(ssim(pool.holdout, stamped).mean())
            evidence.append(ClassEvidence(
                name=name, asr=asr, loss=inversion.loss, statistic=inversion.statistic,
                ssim=similarity, seconds=class_clock.seconds, trigger=inversion.trigger,
            ))
            progress(f"{detector.name}: class {index + 1}/{len(classnames)} {name!r}: "
                     f"ASR {asr:.3f} loss {inversion.loss:.4f} ({class_clock.seconds:.1f}s)")
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
    scores = scorer.score(evidence)
    return ScanResult(
        detector=detector.name, detector_config=to_json(detector.config),
        scorer=scorer.name, scorer_config=to_json(scorer.config),
        classes=tuple(evidence), scores=scores, seconds=clock.seconds,
    )


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def write_scan(result: ScanResult, out: str | Path, pool: OODPool, **context) -> Path:
    """Write ``report.json`` and ``triggers/`` (per class: tensors and a clean/triggered image strip) atomically."""
    out = Path(out)
    if out.exists() and not (out / "report.json").is_file():
        raise ConfigError(f"--out {out} exists and is not an earlier scan (no report.json); choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        triggers = tmp / "triggers"
        triggers.mkdir()
        examples = pool.holdout[:4]
        for index, evidence in enumerate(result.classes):
            stem = f"{index:03d}_{_slug(evidence.name)}"
            evidence.trigger.save(triggers / f"{stem}.safetensors")
            strip = torch.cat([examples, evidence.trigger.apply(examples)])
            save_image(strip, triggers / f"{stem}.png", nrow=len(examples))
        report = result.report(pool=pool.describe(), **context)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report.json"
