"""Every registered plugin passes the contract of its kind (``ci_core.contracts``), as timm tests every registered
model: parametrised over the registry, so a third party's plugins installed here are checked too.

Runs are on the tiny CLIP's architecture with random weights (``random_backbone``), 2-3 classes of 2 images,
one epoch.  The CoOp-layout datasets are checked on a miniature copy of their folder (``coop_layout``).  The
second half breaks one clause at a time in fakes derived from first-party plugins: a contract that passed
them would be vacuous.
"""

import math
import sys

import attrs
import pytest
import torch

from ci_attacks.blended import Blended, BlendTrigger
from ci_attacks.clean import CleanPromptTuning
from ci_core import contracts
from ci_core.contracts import ContractViolation
from ci_core.data.coop import COOP_DATASETS
from ci_core.data.datasets import TINY_DATASETS
from ci_core.models.backbone import TINY_MODEL, load_backbone
from ci_core.models.bundle import ZEROSHOT
from ci_core.plugins import registry
from ci_core.learning.training import PromptTuningConfig, prompt_tune
from ci_detectors.inspector import CLIPInspector
from ci_detectors.scoring import CIScorer
from ci_repairers.repairers import CleanOnlyRepair, copy_model

from coop_layout import build_layout
from test_plugins import FAKE_MODULE, install_fake_distribution

ENTRIES = list(registry().entries())


def entries(kind):
    return pytest.mark.parametrize("entry", [e for e in ENTRIES if e.kind == kind], ids=lambda e: e.name)


@entries("attack")
def test_attack_contract(entry, random_backbone):
    contracts.check_attack(entry.cls, backbone=random_backbone)


@entries("detector")
def test_detector_contract(entry, random_backbone):
    contracts.check_detector(entry.cls, backbone=random_backbone)


@entries("scorer")
def test_scorer_contract(entry):
    contracts.check_scorer(entry.cls)


@entries("repairer")
def test_repairer_contract(entry, random_backbone):
    contracts.check_repairer(entry.cls, backbone=random_backbone)


@entries("dataset")
def test_dataset_contract(entry, tmp_path):
    root = None
    if entry.cls in COOP_DATASETS:
        root = build_layout(tmp_path, entry.name)
    contracts.check_dataset(entry.cls, data_root=root)
    if entry.cls.needs_data_root and root is None:  # what needs no files was checked above
        pytest.skip(f"dataset {entry.name!r} ({entry.distribution}) reads its images from a folder in its own layout, "
                    "which this suite cannot build: its distribution's tests run check_dataset(cls, data_root=...)")


@entries("trigger")
def test_trigger_contract(entry, random_backbone):
    contracts.check_trigger(contracts.produced_trigger(entry.cls, backbone=random_backbone),
                            image_size=random_backbone.image_size)


def test_every_kind_and_first_party_plugin_is_covered():
    kinds = {e.kind for e in ENTRIES}
    assert kinds == {"attack", "detector", "scorer", "repairer", "dataset", "trigger"}
    names = {(e.kind, e.name) for e in ENTRIES}
    assert {("attack", "clean"), ("attack", "encoder-blended"), ("detector", "ci"), ("scorer", "ref-outlier"),
            ("repairer", "ci-trigger"), ("trigger", "warp")} <= names
    assert {cls.name for cls in (*TINY_DATASETS, *COOP_DATASETS)} <= {n for k, n in names if k == "dataset"}


def test_a_third_party_distribution_is_checked_like_the_first_party(tmp_path, monkeypatch, random_backbone):
    install_fake_distribution(tmp_path)  # test_plugins' "third-party" attack, a clean prompt tuning
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.cache_clear()
    try:
        third = [e for e in registry().entries() if e.distribution == "fake-ci-plugin 0.1"]
        assert [(e.kind, e.name) for e in third] == [("attack", "third-party")]
        contracts.check_entry(third[0], backbone=random_backbone)
    finally:
        registry.cache_clear()


# --------------------------------------------------------------------------- broken fakes fail their contract


class OverexposingTrigger(BlendTrigger):
    def apply(self, images):
        return super().apply(images) * 1.5


class OverexposingBlended(Blended):
    """Blended whose trigger brightens images past white."""

    name = "overexposing"

    def run(self, **kwargs):
        outcome = super().run(**kwargs)
        return attrs.evolve(outcome, trigger=OverexposingTrigger(outcome.trigger.pattern, outcome.trigger.alpha))


class UnseededClean(CleanPromptTuning):
    """Clean prompt tuning that nudges its context with the global random state."""

    name = "unseeded"

    def run(self, **kwargs):
        nudge = 0.1 * torch.randn(())  # before the run seeds anything: whatever state the caller left
        outcome = super().run(**kwargs)
        with torch.no_grad():
            outcome.model.prompt_learner.ctx += nudge
        return outcome


class BackboneEditingClean(CleanPromptTuning):
    """Clean prompt tuning that sharpens the shared backbone's logit scale."""

    name = "backbone-editing"

    def run(self, *, backbone, **kwargs):
        with torch.no_grad():
            backbone.model.logit_scale += 0.5
        return super().run(backbone=backbone, **kwargs)


class MislabelledBlended(Blended):
    """Blended that says its models are zero-shot ones."""

    name = "mislabelled"
    bundle_kind = ZEROSHOT


class TargetlessValueError(Blended):
    """Blended that refuses a missing target with a ValueError (as badclip did)."""

    name = "targetless"

    def run(self, *, target, **kwargs):
        if target is None:
            raise ValueError("no target")
        return super().run(target=target, **kwargs)


class NaNLossInspector(CLIPInspector):
    name = "nan-loss"

    def invert(self, **kwargs):
        return attrs.evolve(super().invert(**kwargs), loss=math.nan)


class FreezingInspector(CLIPInspector):
    """Freezes the model it inverts, and leaves it frozen."""

    name = "freezing"

    def invert(self, *, model, **kwargs):
        model.requires_grad_(False)
        return super().invert(model=model, **kwargs)


class OrphanInspector(CLIPInspector):
    name = "orphan"
    default_scorer = "no-such-scorer"


class OrderedScorer(CIScorer):
    """The paper's scores, plus a little for coming first."""

    name = "ordered"

    def score(self, evidence, reference=None):
        scores = super().score(evidence, reference)
        values = tuple(v + 0.01 * (len(evidence) - i) for i, v in enumerate(scores.scores))
        best = max(range(len(values)), key=values.__getitem__)
        return attrs.evolve(scores, scores=values, s_max=values[best], target=evidence[best].name)


class SilentScorer(CIScorer):
    """Flags classes, but calls every model clean."""

    name = "silent"

    def score(self, evidence, reference=None):
        return attrs.evolve(super().score(evidence, reference), backdoored=False, flagged=(evidence[0].name,))


class InPlaceRepair(CleanOnlyRepair):
    """Fine-tunes the model it was given, then returns a copy of it."""

    name = "in-place"

    def repair(self, *, model, clean, seed, **kwargs):
        prompt_tune(model, clean, PromptTuningConfig(epochs=1, batch_size=4, warmup_epochs=0), seed=seed)
        return copy_model(model)


TINY = TINY_DATASETS[0]


class BrightTiny(TINY):
    """The tiny world, twice as bright."""

    name = "bright"

    def load(self, split, **kwargs):
        data = super().load(split, **kwargs)
        return attrs.evolve(data, images=data.images * 2)


class TwinTiny(TINY):
    """The tiny world with two classes of one name."""

    name = "twins"

    @property
    def classnames(self):
        names = super().classnames
        return (names[0], names[0], *names[2:])


BROKEN = {
    "attack trigger leaves [0, 1]": (contracts.check_attack, OverexposingBlended, r"keep pixels in \[0, 1\]"),
    "attack draws from the global random state": (contracts.check_attack, UnseededClean, r"same seed gave another model"),
    "attack says the wrong bundle kind": (contracts.check_attack, MislabelledBlended, r"promises a ZeroShotCLIP"),
    "attack refuses no target with a ValueError": (contracts.check_attack, TargetlessValueError,
                                                   r"raised ValueError: no target.*ConfigError"),
    "detector with a NaN loss": (contracts.check_detector, NaNLossInspector, r"loss must be a finite number, got nan"),
    "detector leaves the model frozen": (contracts.check_detector, FreezingInspector,
                                         r"left as it was: requires_grad flags changed"),
    "detector with an unregistered scorer": (contracts.check_detector, OrphanInspector,
                                             r"default_scorer 'no-such-scorer' is not a registered scorer"),
    "scorer depends on the class order": (contracts.check_scorer, OrderedScorer, r"depends on the order of the classes"),
    "scorer flags a class of a clean model": (contracts.check_scorer, SilentScorer, r"exactly when a class is flagged"),
    "repairer trains the model it was given": (contracts.check_repairer, InPlaceRepair,
                                               r"input model must be left as it was: tensors .*prompt_learner"),
    "dataset images leave [0, 1]": (contracts.check_dataset, BrightTiny, r"pixels must be finite and in \[0, 1\]"),
    "dataset with a class name twice": (contracts.check_dataset, TwinTiny, r"distinct"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_plugin_fails_its_contract(case, random_backbone):
    check, cls, message = BROKEN[case]
    kwargs = {"backbone": random_backbone} if check in (contracts.check_attack, contracts.check_detector,
                                                        contracts.check_repairer) else {}
    with pytest.raises(ContractViolation, match=message):
        check(cls, **kwargs)


def test_an_attack_that_edits_the_backbone_fails_its_contract():
    own = load_backbone(TINY_MODEL, "random:0")  # not the session's: this attack breaks it
    with pytest.raises(ContractViolation, match=r"changed the backbone's weights"):
        contracts.check_attack(BackboneEditingClean, backbone=own)


LOSSY_TRIGGER = FAKE_MODULE + '''
from ci_attacks.blended import BlendTrigger


class LossyBlend(BlendTrigger):
    """A blend whose file forgets its alpha."""

    kind = "lossy-blend"

    @classmethod
    def from_saved(cls, tensors, params):
        return cls(tensors["pattern"], 0.5)


@hookimpl
def register_triggers(register):
    register(LossyBlend)
'''


def test_a_trigger_that_does_not_survive_its_file_fails_its_contract(tmp_path):
    install_fake_distribution(tmp_path, "lossy_plugin", LOSSY_TRIGGER)
    sys.path.insert(0, str(tmp_path))
    registry.cache_clear()
    try:
        lossy = registry().get("trigger", "lossy-blend")
        pattern = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
        contracts.check_trigger(lossy(pattern, 0.5), image_size=8)  # alpha 0.5 survives by chance
        with pytest.raises(ContractViolation, match=r"saved and loaded, it has other params"):
            contracts.check_trigger(lossy(pattern, 0.2), image_size=8)
    finally:
        sys.path.remove(str(tmp_path))  # uninstalled
        sys.modules.pop("lossy_plugin", None)
        registry.cache_clear()
    with pytest.raises(ContractViolation, match=r"kind 'lossy-blend' is not registered"):
        contracts.check_trigger(lossy(pattern, 0.2), image_size=8)
