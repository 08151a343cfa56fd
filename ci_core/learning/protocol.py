"""The protocol of the paper's section 4.2, shared by the CLI, the demo and the benchmarks.

Prompt tuning sees only the base (seen) classes, few-shot; ACC is measured on
base and on new classes; ASR on base classes and on new classes plus the target.
"""

from __future__ import annotations

import random
from pathlib import Path
from collections import Counter
from typing import Any, Mapping, Sequence

import attrs
import torch

from ci_core.data.datasets import Dataset, LabeledImages, base_new_split
from ci_core.errors import ConfigError
from ci_core.learning.evaluation import AttackMetrics, evaluate
from ci_core.interfaces import Attack, AttackOutcome, Detector, Progress, Scorer, silent, to_json
from ci_core.models.bundle import bundle_sha256, read_meta, save_bundle
from ci_core.runtime import Stopwatch
from ci_core.models.backbone import TINY_MODEL, Backbone


@attrs.frozen(kw_only=True, eq=False)
class Task:
    dataset: str
    train: LabeledImages  # few-shot, base classes only
    test: LabeledImages  # every class
    base: tuple[str, ...]
    new: tuple[str, ...]


def load_task(dataset: Dataset, backbone: Backbone, *, seed: int, shots: int = 16, test_per_class: int | None = None,
              progress: Progress = silent) -> Task:
    """Few-shot training images of the base classes (by ``seed``) and the test images of every class.

    ``test_per_class`` caps the test images per class (the same sample for every seed), so that CPU
    runs on large datasets evaluate a subset; None takes the whole test split.
    """
    base, new = base_new_split(dataset.classnames)
    train = dataset.load("train", image_size=backbone.image_size, seed=seed, shots=shots,
                         progress=progress).restrict(base)
    test = dataset.load("test", image_size=backbone.image_size, seed=seed, max_per_class=test_per_class,
                        progress=progress)
    return Task(dataset=dataset.name, train=train, test=test, base=base, new=new)


# The default scan seed of ci-scan and of benchmark scans: an auditor scans every model of a backbone with one
# seed, so one reference scan (per classes, pool and detector setting) serves them all.
SCAN_SEED = 0


def default_target(base: Sequence[str], seed: int) -> str:
    """The base class a benchmark model's backdoor targets: drawn by ``seed`` (known before any training)."""
    return random.Random(seed).choice(tuple(base))


def choose_target(task: Task, seed: int, target: str | None = None) -> str:
    """The backdoor target: ``target`` if given (it must be a base class), else a base class drawn by ``seed``."""
    if target is None:
        return default_target(task.base, seed)
    if target not in task.base:
        raise ConfigError(f"target {target!r} is not a base class of {task.dataset}; base classes: {', '.join(task.base)}")
    return target


# Section 4.2: the scan of a benchmark model inverts triggers for 50 labels, the target among them.
BENCHMARK_CANDIDATES = 50


def sample_candidates(classnames: Sequence[str], *, seed: int, target: str | None = None,
                      count: int = BENCHMARK_CANDIDATES) -> tuple[str, ...]:
    """The candidate classes C of a benchmark scan: ``count`` labels drawn by ``seed``, ``target`` always among them.

    A class set of at most ``count`` labels is returned whole.  The result keeps the order of
    ``classnames``.  ``target`` None (a clean model) draws all ``count`` labels at random.
    """
    classnames = tuple(classnames)
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ConfigError(f"the candidate class count must be an integer of at least 2, got {count!r}")
    duplicates = sorted(c for c, n in Counter(classnames).items() if n > 1)
    if duplicates:
        raise ConfigError(f"the class list names {duplicates[:5]} more than once")
    if target is not None and target not in classnames:
        raise ConfigError(f"target {target!r} is not one of the {len(classnames)} classes")
    if len(classnames) <= count:
        return classnames
    others = [c for c in classnames if c != target]
    picked = set(random.Random(seed).sample(others, count - (target is not None)))
    if target is not None:
        picked.add(target)
    return tuple(c for c in classnames if c in picked)


def scan_candidates(base: Sequence[str], new: Sequence[str], which: str, *, seed: int,
                    target: str | None = None) -> tuple[str, ...]:
    """A benchmark scan's candidates: from every class (``which`` "all", the paper's protocol) or from the base
    classes the model was tuned on ("base", the classes the organisation deploys); ``sample_candidates`` draws up
    to 50 of them by ``seed``, the target among them."""
    if which == "all":
        return sample_candidates(tuple(base) + tuple(new), seed=seed, target=target)
    if which == "base":
        return sample_candidates(base, seed=seed, target=target)
    raise ConfigError(f"candidate classes: expected 'all' or 'base', got {which!r}")


def preset_for(backbone: Backbone | str) -> str | None:
    """The plugin preset that fits a backbone (or an architecture name): 'tiny' on the bundled tiny CLIP, else
    the paper's defaults."""
    name = backbone if isinstance(backbone, str) else backbone.name
    return "tiny" if name == TINY_MODEL else None


# OOD pool sizes (|D|, |T|): the paper's 1000 inversion images for real backbones; on the tiny
# world an eighth of that, scanned in batches of 4 (the ci detector's tiny preset) so that one
# epoch is still the paper's 32 Adam steps at a CPU-friendly cost.
POOL_SIZES = {None: (1000, 500), "tiny": (128, 64)}
MAX_POOL = 100_000  # images in D or T: a pool is held in memory whole (100,000 at 224 px is 60 GB)


def pool_sizes(preset: str | None) -> tuple[int, int]:
    return POOL_SIZES.get(preset, POOL_SIZES[None])


MIN_OWN_PER_CLASS = 12


def own_images_per_class(classes: int, preset: str | None) -> int:
    """Images per class an own-images folder needs for a scan at the preset's default |D| + |T| (both are drawn
    from the folder), and at least ``MIN_OWN_PER_CLASS``."""
    return max(MIN_OWN_PER_CLASS, -(-sum(pool_sizes(preset)) // max(classes, 1)))


def train_and_evaluate(attack: Attack, backbone: Backbone, task: Task, *, target: str | None, seed: int,
                       progress: Progress = silent) -> tuple[AttackOutcome, AttackMetrics]:
    torch.manual_seed(seed)
    outcome = attack.run(backbone=backbone, train=task.train, target=target, seed=seed, progress=progress)
    metrics = evaluate(outcome.model, task.test, task.base, task.new, outcome.trigger, target)
    return outcome, metrics


# A trained model's folder, wherever it lives (``ci-bench attack --out``, the demo, a benchmark store's cell).
MODEL_BUNDLE = "bundle"
MODEL_TRIGGER = "trigger.safetensors"


@attrs.frozen(kw_only=True, eq=False)
class TrainedModel:
    """A model trained by an attack and saved in a folder: ``bundle/`` and, unless clean, ``trigger.safetensors``."""

    outcome: AttackOutcome
    metrics: AttackMetrics
    target: str | None
    bundle_sha256: str
    template: str  # the zero-shot prompt its bundle records (its reference scan classifies with it)
    seconds: float

    def record(self) -> dict:
        """What every caller records of it (the caller adds its own context)."""
        trigger = self.outcome.trigger
        return {"target": self.target, "metrics": to_json(self.metrics), "trigger": trigger.kind if trigger else None,
                "bundle_sha256": self.bundle_sha256, "log": to_json(self.outcome.log)}


def train_and_save(attack: Attack, backbone: Backbone, task: Task, folder: Path, *, target: str | None, seed: int,
                   progress: Progress = silent) -> TrainedModel:
    """Train with ``attack``, evaluate on the task's test images, and write the model and its trigger to ``folder``.

    The one path by which the demo, ``ci-bench attack`` and a sweep's model cells train and save a model.
    """
    clock = Stopwatch()
    outcome, metrics = train_and_evaluate(attack, backbone, task, target=target, seed=seed, progress=progress)
    bundle = save_bundle(outcome.model, task.base + task.new, Path(folder) / MODEL_BUNDLE, base_classes=task.base)
    meta = read_meta(bundle)
    written = meta["kind"]
    if written != attack.bundle_kind:  # sweeps plan repairs by the declared kind, before any training
        raise ConfigError(f"attack {attack.name} declares bundle_kind {attack.bundle_kind!r} but its model was saved "
                          f"as a {written!r} bundle; fix the attack's bundle_kind")
    if outcome.trigger is not None:
        outcome.trigger.save(Path(folder) / MODEL_TRIGGER)
    return TrainedModel(outcome=outcome, metrics=metrics, target=target, bundle_sha256=bundle_sha256(bundle),
                        template=meta["template"], seconds=clock.seconds)


# The verdict of a scan with a reference (ci-scan, the demo, the benchmark's default): the calibrated
# comparison with the backbone.  Without a reference the detector's own scorer (the paper's) decides.
REFERENCE_SCORER = "ref-outlier"


def choose_scorers(plugins, detector: Detector | type[Detector], *, scorer: str | None = None,
                   options: Mapping[str, Any] | None = None, configs: Mapping[str, Mapping[str, Any]] | None = None,
                   preset: str | None = None, reference: bool = True,
                   option_flag: str = "--scorer") -> tuple[Scorer, tuple[Scorer, ...]]:
    """(the scorer whose verdict counts, the scorers reported beside it) for a scan by ``detector``.

    With a reference the calibrated ``REFERENCE_SCORER`` decides unless ``scorer`` names another, and the
    detector's own scorer is reported beside it; without one the detector's own scorer decides, and a
    scorer that needs a reference is an error that names ``option_flag``.  ``configs`` (scorer name ->
    options) configure any of them, ``options`` the deciding one on top.
    """
    configs = configs or {}
    own = detector.default_scorer
    name = scorer or (REFERENCE_SCORER if reference else own)
    decider_cls = plugins.get("scorer", name)
    try:
        decider_cls.check_inputs(reference=reference)
    except ConfigError as exc:
        raise ConfigError(f"{option_flag} {name}: {exc} such as {own!r}") from None
    decider = decider_cls.from_options({**configs.get(name, {}), **(options or {})}, preset=preset)
    also = () if name == own else (plugins.get("scorer", own).from_options(configs.get(own), preset=preset),)
    return decider, also
