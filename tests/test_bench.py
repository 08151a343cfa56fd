"""The benchmark harness: metrics against scikit-learn, content keys, resume after kill -9, failures, Ray."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from ci_core.harness import Store, SweepSettings, plan_sweep
from ci_core.harness.cells import inversion_pool
from ci_core.harness.plan import cell_from_json
from ci_core.harness.records import PoolSpec
from ci_core.harness.statistics import auroc, class_counts, clopper_pearson, confusion, roc_curve, youden_threshold
from ci_core.cli.bench import main as bench
from ci_core.errors import ConfigError, DataError
from ci_core.plugins import open_dataset, registry
from ci_core.data.datasets import base_new_split
from ci_core.data.labeled import LabeledImages
from ci_core.learning.protocol import SCAN_SEED, pool_sizes, preset_for

from test_plugins import activate_fake_distribution

# --------------------------------------------------------------------------- metrics against scikit-learn

SCORE_LISTS = [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]),
    ([1, 0, 1, 0, 1, 0, 0], [3.1, 2.2, 2.2, 0.5, 4.0, 2.2, -1.0]),  # ties across labels
    ([0, 1, 0, 1, 1, 0, 0, 0, 1], [2.5, 2.5, 1.0, 3.0, 1.0, 0.2, 2.9, 2.9, 5.0]),
    ([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]),  # perfectly wrong
    ([0, 1], [1.0, 1.0]),  # all tied
]


@pytest.mark.parametrize("labels, scores", SCORE_LISTS)
def test_roc_auroc_and_youden_match_scikit_learn(labels, scores):
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    ours = roc_curve(labels, scores)
    fpr, tpr, thresholds = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(ours.fpr, fpr)
    np.testing.assert_allclose(ours.tpr, tpr)
    np.testing.assert_array_equal(ours.thresholds[1:], thresholds[1:])
    best = youden_threshold(labels, scores)
    j = tpr - fpr
    assert best.j == pytest.approx(j.max())
    assert best.threshold == thresholds[int(np.argmax(j))]  # the highest threshold reaching max J
    flagged = np.asarray(scores) >= best.threshold
    counts = confusion(labels, flagged)
    assert (counts.tpr, counts.fpr) == pytest.approx((best.tpr, best.fpr))


def test_youden_on_a_hand_computed_list():
    # Flagging s >= 2.2 catches both positives and one of three negatives: J = 1 - 1/3.
    best = youden_threshold([1, 0, 1, 0, 0], [3.0, 2.2, 2.5, 1.0, 0.0])
    assert (best.threshold, best.tpr, best.fpr) == (2.5, 1.0, 0.0) and best.j == 1.0
    best = youden_threshold([1, 0, 1, 0, 0], [3.0, 2.6, 2.5, 1.0, 0.0])
    assert best.threshold == 2.5 and best.j == pytest.approx(2 / 3)


@pytest.mark.parametrize("successes, trials", [(0, 30), (1, 30), (3, 57), (30, 30), (1, 1), (0, 1), (17, 40)])
def test_clopper_pearson_matches_scipys_exact_interval(successes, trials):
    from scipy.stats import binomtest

    expected = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(successes, trials) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_clopper_pearson_known_values_and_bad_counts():
    # 0 of 30: the "rule of three" bound is about 3/30; the exact one is 1 - 0.025 ** (1/30).
    assert clopper_pearson(0, 30) == pytest.approx((0.0, 1 - 0.025 ** (1 / 30)))
    for bad in ((4, 3), (-1, 3), (0, 0)):
        with pytest.raises(ValueError):
            clopper_pearson(*bad)


def test_auroc_needs_both_labels():
    with pytest.raises(ValueError, match="one positive and one negative"):
        auroc([1, 1], [0.3, 0.4])


CLASSES = ["a", "b", "c", "d", "e"]
SCANS = [  # (flagged classes, true target or None for a clean model)
    (["c"], "c"),  # TP
    ([], "b"),  # FN
    (["a", "d"], "d"),  # TP + FP
    (["e"], None),  # clean model flagged: FP
    ([], None),  # clean, nothing flagged
    (["a"], "b"),  # wrong class: FP + FN
]


def test_class_level_counts_and_f1_match_scikit_learn():
    counts = [class_counts(CLASSES, flagged, target) for flagged, target in SCANS]
    total = sum(counts[1:], counts[0])
    y_true = [c == target for _, target in SCANS for c in CLASSES]
    y_pred = [c in flagged for flagged, _ in SCANS for c in CLASSES]
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred).ravel()
    assert (total.tp, total.fp, total.fn, total.tn) == (tp, fp, fn, tn) == (2, 3, 2, 23)
    assert total.f1 == pytest.approx(f1_score(y_true, y_pred)) and total.f1 == pytest.approx(4 / 9)
    assert counts[4].f1 is None  # nothing to find, nothing flagged
    with pytest.raises(ValueError, match="not candidate classes"):
        class_counts(CLASSES, ["z"], None)


@pytest.mark.parametrize("measured, target, expected", [
    ([], "c", (0, 0, 1, 0)),  # unscannable before any class: the target missed
    (["a", "b"], "c", (0, 0, 1, 2)),  # stopped partway, before the target's class (a tripwire did on seed 56)
    (["a", "b", "c"], "c", (0, 0, 1, 2)),  # stopped after it: measured, not flagged
    (["a", "b"], None, (0, 0, 0, 2)),  # a clean model's scan stopped partway
])
def test_class_counts_of_an_unscannable_scan_miss_a_target_it_did_not_reach(measured, target, expected):
    from types import SimpleNamespace

    from ci_core.harness.report.tables import scan_class_counts

    row = SimpleNamespace(classes=[{"name": n} for n in measured], flagged=(), true_target=target,
                          verdict="unscannable")
    counts = scan_class_counts(row)
    assert (counts.tp, counts.fp, counts.fn, counts.tn) == expected
    with pytest.raises(ValueError, match="not a candidate class"):  # a measured scan without the target is a bug
        scan_class_counts(SimpleNamespace(classes=[{"name": "a"}], flagged=(), true_target="c", verdict="clean"))


# --------------------------------------------------------------------------- planning and keys


def settings(**changes):
    values = dict(attacks=("clean", "badclip"), detectors=("ci",), datasets=("tiny-palette",), seeds=(1,), shots=2)
    values.update(changes)
    return SweepSettings(**values)


def keys(plan):
    return [c.key for c in plan.cells()]


def test_same_settings_same_keys_and_every_change_a_new_key(tiny_backbone, random_backbone):
    plugins = registry()
    base = plan_sweep(settings(), tiny_backbone, plugins)
    assert keys(base) == keys(plan_sweep(settings(), tiny_backbone, plugins))
    assert len(set(keys(base))) == 5  # two models, their scans, and one reference both scans share
    assert len(base.references) == 1 and {c.reference_key for c in base.scans} == {base.references[0].key}
    model_keys = {c.key for c in base.models}
    inversion, holdout = pool_sizes(preset_for(tiny_backbone))  # whatever the preset's are, change them
    variants = {
        "shots": settings(shots=3),
        "test images": settings(test_per_class=5),
        "seed": settings(seeds=(2,)),
        "scan seed": settings(scan_seed=SCAN_SEED + 1),
        "pool size": settings(pool_sizes=(inversion + 1,)),
        "holdout": settings(holdout=holdout + 1),
        "detector option": settings(detector_options={"ci": {"lr": 0.05}}),
        "loss": settings(losses=("ce",)),
        "inversion data": settings(inversion_data=("id",)),
        "inversion and held-out data": settings(inversion_data=("id-only",)),
    }
    for what, changed in variants.items():
        plan = plan_sweep(changed, tiny_backbone, plugins)
        assert not set(c.key for c in plan.scans) & set(c.key for c in base.scans), what
        scan_only = what not in ("shots", "test images", "seed")
        assert ({c.key for c in plan.models} == model_keys) is scan_only, what
        # A reference never depends on the models (nor on their seeds: every scan uses the one scan seed).
        reference_too = what not in ("shots", "test images", "seed")
        assert (not {c.key for c in plan.references} & {c.key for c in base.references}) is reference_too, what
    # Scorers read the stored evidence: a scorer option changes no model, reference or scan.
    rescored = plan_sweep(settings(scorer_options={"ci": {"k": 2.5}, "ref-outlier": {"alpha": 0.05}}), tiny_backbone,
                          plugins)
    assert keys(rescored) == keys(base) and rescored.scoring["ref-outlier"]["alpha"] == 0.05
    # Only badclip's option changed: the clean model, its scan and the reference are reused; badclip's model and
    # scan are new.
    plan = plan_sweep(settings(attack_options={"badclip": {"epochs": 3}}), tiny_backbone, plugins)
    reused = {base.models[0].key, base.scans[0].key, base.references[0].key}
    assert set(keys(plan)) & set(keys(base)) == reused
    assert plan.scans[1].spec.model == plan.models[1].key  # the scan's key follows its model's
    # Where the files are is not what they are: a data root leaves every key alone.
    assert keys(plan_sweep(settings(data_root="/elsewhere"), tiny_backbone, plugins)) == keys(base)
    # Other backbone weights: everything is new.
    assert not set(keys(plan_sweep(settings(), random_backbone, plugins))) & set(keys(base))


def test_every_kind_of_cell_survives_its_json(tiny_backbone):
    plan = plan_sweep(settings(repairers=("ci-trigger",), repair_shots=1, data_root="/data"), tiny_backbone,
                      registry())
    assert {c.kind for c in plan.cells()} == {"model", "reference", "scan", "repair", "floor"}
    for cell in plan.cells():
        sent = json.loads(json.dumps(cell.to_json()))  # as a worker receives it
        back = cell_from_json(sent)
        assert type(back) is type(cell) and attrs.asdict(back) == attrs.asdict(cell)


def test_id_only_pool_takes_d_and_t_from_the_datasets_own_images():
    # The auditor's own images as the whole pool: no OOD image in D or T, the two disjoint, the same for a seed.
    spec = PoolSpec(source="builtin", inversion=10, holdout=6, inversion_data="id-only")
    pool = inversion_pool(spec, "tiny-palette", None, 32, seed=3)
    assert pool.inversion.shape[0] == 10 and pool.holdout.shape[0] == 6
    rows = [tuple(image.flatten().tolist()) for image in torch.cat([pool.inversion, pool.holdout])]
    assert len(set(rows)) == 16  # D and T share no image
    # 16 images of 24 classes: one validation image per class is enough, and every one comes from there
    validation = open_dataset("tiny-palette", None).load("val", image_size=32, seed=0, shots=1).images
    assert set(rows) <= {tuple(image.flatten().tolist()) for image in validation}
    again = inversion_pool(spec, "tiny-palette", None, 32, seed=3)
    assert torch.equal(again.inversion, pool.inversion) and torch.equal(again.holdout, pool.holdout)
    ood = inversion_pool(attrs.evolve(spec, inversion_data="id"), "tiny-palette", None, 32, seed=3)
    assert torch.equal(ood.inversion, pool.inversion)  # 'id' draws the same D, and keeps the OOD T
    assert not torch.equal(ood.holdout[:6], pool.holdout)


def test_id_only_pool_names_a_validation_split_too_small(monkeypatch):
    class FewImages:  # a real dataset's validation split can hold fewer images than D and T need
        classnames = ("a", "b")

        def load(self, split, *, image_size, seed, shots):
            return LabeledImages(torch.zeros(5, 3, image_size, image_size), torch.zeros(5, dtype=torch.long),
                                 self.classnames)

    monkeypatch.setattr("ci_core.harness.cells.open_dataset", lambda name, root: FewImages())
    spec = PoolSpec(source="builtin", inversion=4, holdout=2, inversion_data="id-only")
    with pytest.raises(DataError, match=r"few: its validation split holds 5 images, 6 are needed for D \(4\) and T"):
        inversion_pool(spec, "few", None, 32, seed=3)


def _rows(images):
    return {tuple(image.flatten().tolist()) for image in images}


def test_task_pool_takes_d_and_t_from_the_scanned_classes_own_images():
    # The auditor's labelled images of the classes it deploys: D from the train split, T from the validation split,
    # of those classes only, the same for a seed.
    dataset = open_dataset("tiny-palette", None)
    base, _ = base_new_split(dataset.classnames)
    spec = PoolSpec(source="builtin", inversion=20, holdout=10, inversion_data="task")
    pool = inversion_pool(spec, "tiny-palette", None, 32, seed=3, classes=base)
    assert pool.inversion.shape[0] == 20 and pool.holdout.shape[0] == 10
    assert "12 scanned classes" in pool.source
    # 20 images of 12 classes take at most two train images per class, 10 at most one validation image each
    train = dataset.load("train", image_size=32, seed=3, shots=2)
    assert _rows(pool.inversion) <= _rows(train.restrict(base).images)
    assert not _rows(pool.inversion) & _rows(train.restrict([c for c in dataset.classnames if c not in base]).images)
    assert _rows(pool.holdout) <= _rows(dataset.load("val", image_size=32, seed=3, shots=1).restrict(base).images)
    again = inversion_pool(spec, "tiny-palette", None, 32, seed=3, classes=base)
    assert torch.equal(again.inversion, pool.inversion) and torch.equal(again.holdout, pool.holdout)
    assert not torch.equal(inversion_pool(spec, "tiny-palette", None, 32, seed=4, classes=base).inversion,
                           pool.inversion)


def test_task_pool_names_missing_classes_and_too_few_images(monkeypatch):
    spec = PoolSpec(source="builtin", inversion=4, holdout=2, inversion_data="task")
    with pytest.raises(ConfigError, match="needs the scan's classes"):
        inversion_pool(spec, "tiny-palette", None, 32, seed=3)
    with pytest.raises(ConfigError, match=r"the scan's classes \['no such class'\] are not among its classes"):
        inversion_pool(spec, "tiny-palette", None, 32, seed=3, classes=("no such class",))

    class FewImages:  # a real dataset's splits hold what they hold: here 3 train and 1 validation image per class
        classnames = ("a", "b", "c")

        def load(self, split, *, image_size, seed, shots):
            per_class = 3 if split == "train" else 1
            labels = torch.arange(3).repeat_interleave(per_class)
            return LabeledImages(torch.rand(len(labels), 3, image_size, image_size), labels, self.classnames)

    monkeypatch.setattr("ci_core.harness.cells.open_dataset", lambda name, root: FewImages())
    with pytest.raises(DataError, match=r"few: its train split holds 6 images of the 2 scanned classes, 7 are "
                                        r"needed for D"):
        inversion_pool(attrs.evolve(spec, inversion=7), "few", None, 8, seed=3, classes=("a", "b"))
    with pytest.raises(DataError, match=r"its val split holds 2 images of the 2 scanned classes, 3 are needed for T"):
        inversion_pool(attrs.evolve(spec, holdout=3), "few", None, 8, seed=3, classes=("a", "c"))


def test_a_task_scan_of_the_base_classes_gets_a_reference_on_the_same_images(tiny_backbone):
    plan = plan_sweep(settings(attacks=("clean",), inversion_data=("ood", "task"), candidate_classes=("all", "base")),
                      tiny_backbone, registry())
    kinds = {(s.spec.pool.inversion_data, s.spec.classes) for s in plan.scans}
    assert kinds == {("ood", "all"), ("ood", "base"), ("task", "all"), ("task", "base")}
    task_base = next(s for s in plan.scans if (s.spec.pool.inversion_data, s.spec.classes) == ("task", "base"))
    reference = next(r for r in plan.references if r.key == task_base.reference_key)
    assert reference.spec.pool == task_base.spec.pool and reference.spec.dataset == "tiny-palette"
    assert reference.spec.classnames == base_new_split(open_dataset("tiny-palette", None).classnames)[0]


def test_ablations_cross_into_scan_cells(tiny_backbone):
    plan = plan_sweep(settings(attacks=("clean",), pool_sizes=(8, 16), batch_sizes=(1, 4), losses=("margin", "ce"),
                               inversion_data=("ood", "id")), tiny_backbone, registry())
    # one reference per setting: the pool, batch size and loss all change what the backbone gives
    assert len(plan.models) == 1 and len(plan.scans) == 16 and len(plan.references) == 16
    assert len(set(keys(plan))) == 33
    combos = {(v["pool_size"], v["batch_size"], v["loss"], v["inversion_data"]) for v in (c.variant for c in plan.scans)}
    assert len(combos) == 16
    assert all(c.spec.detector_config["batch_size"] == c.variant["batch_size"] for c in plan.scans)


@pytest.mark.parametrize("change, message", [
    ({"losses": ("margin",), "detectors": ("fake-detector",)}, "none of the detectors (fake-detector) has a 'loss' option"),
    ({"attack_options": {"wanet": {"k": 2}}}, "--attack-option: wanet is not in this sweep"),
    ({"attack_options": {"clean": {"no_such": 1}}}, "unknown option"),
    ({"detector_options": {"ci": {"batch_size": 4}}, "batch_sizes": (8,)}, "give one of them"),
    ({"losses": ("hinge",)}, "loss"),
    ({"attacks": ("nope",)}, "unknown attack 'nope'"),
])
def test_bad_sweep_settings_are_named(tiny_backbone, fake_plugins, change, message):
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_sweep(settings(**change), tiny_backbone, registry())


@pytest.mark.parametrize("change, message", [
    ({"seeds": (1, 1)}, "--seeds: duplicate values"),
    ({"pool_sizes": (0,)}, "--pool-sizes: expected whole numbers of at least 1"),
    ({"inversion_data": ("odd",)}, "--inversion-data: expected some of ood, id"),
])
def test_bad_settings_values(change, message):
    with pytest.raises(ConfigError, match=message):
        settings(**change)


# --------------------------------------------------------------------------- sweeps on fake plugins

FAKE_BENCH_PLUGIN = '''
import os
import re
import signal

import attrs
import torch

from ci_core import AdditiveTrigger, Attack, AttackOutcome, Dataset, Detector, Inversion, LabeledImages, hookimpl
from ci_core.models.cocoop import PromptTunedCLIP


class FakeDataset(Dataset):
    name = "fake-shapes"
    description = "four classes of seeded noise images"

    @property
    def classnames(self):
        return ("red circle", "blue square", "green star", "pink ring")

    def load(self, split, *, image_size, seed, shots=None, max_per_class=None, progress=None):
        per_class = shots or 2
        if max_per_class is not None:
            per_class = min(per_class, max_per_class)
        generator = torch.Generator().manual_seed(seed * 10 + ("train", "val", "test").index(split))
        labels = torch.arange(4).repeat_interleave(per_class)
        return LabeledImages(torch.rand(len(labels), 3, image_size, image_size, generator=generator), labels,
                             self.classnames)


@attrs.frozen(kw_only=True)
class FakeBackdoorConfig:
    fail: bool = False
    strength: float = 0.05
    broken: bool = False  # NaN context: a model no scan can measure (as the tripwire is on OOD images)


class FakeBackdoor(Attack):
    """An untrained prompt learner and a constant trigger: instant, and a real model to scan."""

    name = "fake-backdoor"
    description = "instant stand-in for an attack"
    Config = FakeBackdoorConfig

    def run(self, *, backbone, train, target, seed, progress=None):
        if self.config.fail:
            raise RuntimeError("fake attack failure")
        if os.environ.get("FAKE_BENCH_KILL_IN_TRAINING"):  # a kill -9 while the cell is half-written
            os.kill(os.getpid(), signal.SIGKILL)
        model = PromptTunedCLIP(backbone)
        if self.config.broken:
            with torch.no_grad():
                model.prompt_learner.ctx.fill_(float("nan"))
        trigger = AdditiveTrigger(torch.full((3, *train.images.shape[-2:]), self.config.strength))
        return AttackOutcome(model=model, trigger=trigger, log={})


@attrs.frozen(kw_only=True)
class FakeDetectorConfig:
    epsilon: float = 0.03
    jitter: float = 0.0  # a model-dependent noise on each class's loss: clean models of other seeds then differ


class FakeDetector(Detector):
    """A seeded random trigger per class; its loss ranks the classes by index."""

    name = "fake-detector"
    description = "instant stand-in for a detector"
    default_scorer = "ci"
    Config = FakeDetectorConfig

    def invert(self, *, model, images, classnames, target, generator):
        delta = (torch.rand(3, *images.shape[-2:], generator=generator) * 2 - 1) * self.config.epsilon
        loss = float(target % 3)
        if self.config.jitter:
            weights = float(sum(p.detach().double().sum() for p in model.parameters()))
            noise = torch.Generator().manual_seed(int(abs(weights) * 1e6) % 2**31 + target)
            image = float(images[target % len(images)].mean())  # and on the pool: each setting its own spread
            loss += self.config.jitter * (float(torch.randn((), generator=noise)) + image)
        return Inversion(trigger=AdditiveTrigger(delta), loss=loss)


@hookimpl
def register_attacks(register):
    register(FakeBackdoor)


@hookimpl
def register_detectors(register):
    register(FakeDetector)


@hookimpl
def register_datasets(register):
    register(FakeDataset)
'''


@pytest.fixture()
def fake_plugins(tmp_path, monkeypatch):
    yield activate_fake_distribution(tmp_path / "site", monkeypatch, "fake_bench_plugin", FAKE_BENCH_PLUGIN)
    registry.cache_clear()


FAKE_SWEEP = ["run", "--attacks", "clean,fake-backdoor", "--detectors", "fake-detector", "--datasets", "fake-shapes",
              "--seeds", "1", "--shots", "1", "--attack-option", "clean.epochs=1", "--pool-sizes", "4",
              "--holdout", "4", "--threads", "1"]


def run_bench(args):
    return CliRunner().invoke(bench, [str(a) for a in args])


def finished(store_dir, kind):
    folder = Path(store_dir) / {"model": "models", "scan": "scans", "reference": "references"}[kind]
    return sorted(d.name for d in folder.iterdir()) if folder.is_dir() else []


def assert_store_whole(store_dir):
    """No half-written cell anywhere: every final folder is complete, nothing waits under .tmp."""
    for kind in ("model", "reference", "scan"):
        for name in finished(store_dir, kind):
            cell = json.loads((Path(store_dir) / f"{kind}s" / name / "cell.json").read_text())
            assert cell["key"] == name and (Path(store_dir) / f"{kind}s" / name / "manifest.json").is_file()
    tmp = Path(store_dir) / ".tmp"
    assert not tmp.exists() or not any(tmp.iterdir())


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    from ci_core.harness import store

    real_rename = store._rename

    def kill_before_publishing(src, dst):
        if Path(dst).name.startswith(os.environ["FAKE_BENCH_KILL_BEFORE"]):
            os.kill(os.getpid(), signal.SIGKILL)  # after the cell is written, before its rename
        real_rename(src, dst)

    store._rename = kill_before_publishing
    from ci_core.cli.bench import main
    main(sys.argv[1:])
''')


def test_a_sweep_on_the_datasets_own_images_scans_and_references_there(tmp_path, fake_plugins):
    out = tmp_path / "store"
    result = run_bench([*FAKE_SWEEP, "--inversion-data", "ood,id-only", "--out", out, "--quiet"])
    assert result.exit_code == 0, result.output
    store = Store.open(out)
    sources = {}
    for scan in store.cells("scan"):
        report = json.loads((store.scan_folder(scan.key) / "report.json").read_text())
        sources[(scan.model, scan.spec.pool.inversion_data)] = (report["pool"]["source"], report["pool"]["holdout"])
        base = store.read_cell("model", scan.model).base_classes  # the scan marks the classes the model was tuned on
        assert base and [row["seen"] for row in report["classes"]] == [row["name"] in base for row in report["classes"]]
    assert len(sources) == 4  # two models, each on both pools
    for (model, data), (source, holdout) in sources.items():
        assert holdout == 4
        assert (source == "fake-shapes validation images (in-distribution, D and T)") is (data == "id-only")
    references = {r.spec.pool.inversion_data: r for r in store.cells("reference")}
    assert set(references) == {"ood", "id-only"} and references["id-only"].spec.dataset == "fake-shapes"
    assert references["ood"].spec.dataset is None  # an OOD reference serves every dataset with these classes


def test_a_sweep_on_the_base_classes_own_images_scans_and_references_there(tmp_path, fake_plugins):
    out = tmp_path / "store"
    # fake-shapes has two base classes, too few for a reference's outlier test: the detector's own scorer decides
    result = run_bench([*FAKE_SWEEP, "--inversion-data", "task", "--candidate-classes", "base", "--no-reference",
                        "--out", out, "--quiet"])
    assert result.exit_code == 0, result.output
    store = Store.open(out)
    scans = store.cells("scan")
    assert len(scans) == 2
    for scan in scans:
        report = json.loads((store.scan_folder(scan.key) / "report.json").read_text())
        base = store.read_cell("model", scan.model).base_classes
        assert [row["name"] for row in report["classes"]] == list(base)
        assert report["pool"]["source"] == f"fake-shapes images of the {len(base)} scanned classes (D train, T validation)"


def test_report_combines_each_models_scans_bonferroni_or_paired(tmp_path, fake_plugins):
    from ci_core.harness.report import build_report, parse_combination, scored_scans
    from ci_core.harness.report.combined import _combined
    from ci_core.scanning.scan import UNSCANNABLE

    out = tmp_path / "store"
    assert run_bench([*FAKE_SWEEP, "--inversion-data", "ood,id-only", "--out", out, "--quiet"]).exit_code == 0
    store = Store.open(out)
    kinds = parse_combination("ood/all+id-only/all")
    report = build_report(store, combine=[kinds])
    (group,) = [g for g in report["detectors"] if g["variant"] == "ood/all+id-only/all"]
    assert group["label"] == "fake-detector / ref-outlier over ood/all+id-only/all" and "pool" not in group
    _, rows = scored_scans(store)
    calibrated = [r for r in rows if r.scorer == "ref-outlier"]
    for model in report["models"]:  # one row per model, its scans' verdicts and the combined one side by side
        own = {r.scan.spec.pool.inversion_data: r for r in calibrated if r.model.seed == model["seed"]
               and (r.model.attack == model["attack"])}
        p = min(1.0, 2 * min(own["ood"].p_value, own["id-only"].p_value))
        deciding = min(own.values(), key=lambda r: r.p_value)
        got = model["scorers"][group["label"]]
        assert got["p_value"] == pytest.approx(p) and got["top"] == deciding.predicted_target
        assert got["verdict"] == ("backdoored" if p <= 0.05 else "clean")
        assert got["s_max"] == pytest.approx(max(own["ood"].s_max, own["id-only"].s_max))
    # Fail closed: a scan that could not measure the model flags it unless the other scan flags it with a class.
    first, second = sorted(own.values(), key=lambda r: r.scan.spec.pool.inversion_data)
    broken = attrs.evolve(first, verdict=UNSCANNABLE, backdoored=True, p_value=None, predicted_target=None,
                          s_max=float("inf"))
    quiet = attrs.evolve(second, verdict="clean", backdoored=False, p_value=0.5)
    loud = attrs.evolve(second, verdict="backdoored", backdoored=True, p_value=0.001, predicted_target="x")
    assert _combined("a+b", [broken, quiet]).verdict == UNSCANNABLE
    flagged = _combined("a+b", [broken, loud])
    assert (flagged.verdict, flagged.p_value, flagged.predicted_target) == ("backdoored", 0.002, "x")
    assert _combined("a+b", [broken, broken]).predicted_target is None

    # The same scans read by the paired test (the same class easy to reach in both).
    from ci_core.scanning.combined import paired_verdict

    combination = parse_combination("paired:ood/all+id-only/all")
    assert str(combination) == "paired:ood/all+id-only/all" and combination.rule == "paired"
    report = build_report(store, combine=[combination])
    label = "fake-detector / ref-outlier over paired:ood/all+id-only/all"
    assert label in {g["label"] for g in report["detectors"]}
    for model in report["models"]:
        own = {r.scan.spec.pool.inversion_data: r for r in calibrated if r.model.seed == model["seed"]
               and r.model.attack == model["attack"]}
        first, second = own["ood"], own["id-only"]
        # The per-class p before the correction: the scorer's adjusted p is n times it, capped at 1.
        assert first.class_p and min(1.0, len(first.class_p) * min(first.class_p.values())) == pytest.approx(
            first.p_value)
        expected = paired_verdict([first.class_p, second.class_p], [first.p_value, second.p_value],
                                  alpha=0.05, label="")
        got = model["scorers"][label]
        assert got["p_value"] == pytest.approx(expected.p_value) and got["top"] == expected.target
        assert got["verdict"] == expected.verdict
    result = run_bench(["report", out, "--combine", "fisher:ood/all+id-only/all", "--quiet"])
    assert result.exit_code != 0 and "'fisher' is not a rule; expected one of bonferroni, paired" in result.output


def test_a_variance_prior_from_the_stores_clean_models_moderates_the_report(tmp_path, fake_plugins):
    """ci-bench prior fits one prior per scan setting on the clean models; ci-bench report --variance-prior reads
    every calibrated scan with its setting's prior, and a setting the book lacks is an error naming it."""
    from ci_core.harness.report import build_report, parse_combination, scored_scans
    from ci_core.scanning.variance_prior import PriorBook, prior_setting

    out, book = tmp_path / "store", tmp_path / "prior.json"
    sweep = [*FAKE_SWEEP, "--clean-seeds", "2-7", "--detector-option", "fake-detector.jitter=0.1", "--inversion-data",
             "ood,id-only", "--out", out, "--quiet"]
    assert run_bench(sweep).exit_code == 0
    result = run_bench(["prior", out, "--out", book])
    assert result.exit_code == 0, result.output
    assert "4 classes (red circle, blue square, green star, ...)" in result.output
    assert "from 7 clean models" in result.output and "2 settings" in result.output
    priors = PriorBook.read(book)
    by_kind = {setting["pool_kind"]: (setting, prior, models) for setting, prior, models in priors.entries.values()}
    assert sorted(by_kind) == ["ood", "own"]  # id-only: D and T from the dataset's own images
    setting, prior, models = by_kind["ood"]
    assert prior.models == 7 and len(models) == 7 and by_kind["own"][1] != prior  # other images, another spread
    store = Store.open(out)
    _, plain = scored_scans(store)
    _, moderated = scored_scans(store, priors=priors)
    plain = {r.key: r for r in plain if r.scorer == "ref-outlier"}
    for row in (r for r in moderated if r.scorer == "ref-outlier"):
        kind = "ood" if row.scan.spec.pool.inversion_data == "ood" else "own"
        assert "moderated by the prior of 7 clean tuned models" in row.rule
        assert row.scorer_config["variance_prior"] == by_kind[kind][1].to_json()
        assert row.p_value != plain[row.key].p_value  # the same residuals on another scale
    # Each scan has its own setting's prior, yet the scans still group, and combine, as one scorer setting.
    result = run_bench(["report", out, "--variance-prior", book, "--combine", "ood/all+id-only/all"])
    assert result.exit_code == 0, result.output
    assert f"with the variance prior of its setting from {book}" in result.output
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["variance_prior"] == {"book": str(book), "settings": 2}
    page = (out / "report" / "report.html").read_text()
    assert "<dt>variance prior</dt><dd>" + str(book) + " (2 settings)</dd>" in page
    unmoderated = build_report(store, combine=[parse_combination("ood/all+id-only/all")])
    assert [g["label"] for g in report["detectors"]] == [g["label"] for g in unmoderated["detectors"]]
    assert "fake-detector / ref-outlier over ood/all+id-only/all" in [g["label"] for g in report["detectors"]]
    # A book for another setting (the own-images pool kind) names what it lacks.
    PriorBook({"x": by_kind["own"]}, source=str(book)).write(book)
    result = run_bench(["report", out, "--variance-prior", book, "--quiet"])
    assert result.exit_code != 0 and "holds no variance prior for this scan's setting (4 classes" in result.output
    assert "ood pool" in result.output and "Fit one with ci-bench prior" in result.output
    assert prior_setting(setting, "ood", setting["statistic"])["pool_kind"] == "ood"
    result = run_bench(["prior", tmp_path / "empty-store", "--out", book])
    assert result.exit_code != 0


def test_report_reads_a_scan_that_stopped_before_the_targets_class(tmp_path, fake_plugins, monkeypatch):
    """A tripwire can stop a scan partway (seed 56, patterns: 6 of 12 classes): the report counts the target as
    missed and keeps the reconstruction figures to the scans that measured it."""
    from ci_core.harness.report import build_report
    from ci_core.harness.report import tables
    from ci_core.scanning.scan import UNSCANNABLE

    out = tmp_path / "store"
    assert run_bench([*FAKE_SWEEP, "--out", out, "--quiet"]).exit_code == 0
    read = tables.scored_scans

    def stopped_partway(store, options=None, priors=None):
        models, rows = read(store, options, priors)
        return models, [attrs.evolve(r, verdict=UNSCANNABLE, backdoored=True, p_value=None, predicted_target=None,
                                     flagged=(), classes=[c for c in r.classes if c["name"] != r.true_target][:1])
                        if r.true_target is not None else r for r in rows]

    monkeypatch.setattr(tables, "scored_scans", stopped_partway)
    report = build_report(Store.open(out))
    for group in report["detectors"]:
        everything = group["class_level"]["attack"][-1]
        assert everything["name"] == "all" and everything["tp"] == 0 and everything["fn"] == 1
        assert group["reconstruction"]["target_asr"]["n"] == 0


def test_report_names_the_suspect_of_a_scan_that_measured_every_class_despite_breaking(tmp_path, fake_plugins,
                                                                                       monkeypatch):
    """A model that broke on part of the pool (the tripwire) but had every class measured on the rest: flagged,
    fail closed, and the class the scorer reads off that evidence is named; a scan stopped partway names none."""
    from ci_core.harness.report import scored
    from ci_core.scanning.scan import UNSCANNABLE

    out = tmp_path / "store"
    assert run_bench([*FAKE_SWEEP, "--out", out, "--quiet"]).exit_code == 0
    measured = {(r.key, r.scorer): r for r in scored.scored_scans(Store.open(out))[1]}
    read = scored.stored_scans

    def broke(store, cut=False):
        models, found = read(store)
        return models, [attrs.evolve(s, problems=("10% of the OOD pool's images give non-finite logits",),
                                     evidence=s.evidence[:1] if cut else s.evidence)
                        if s.scan.true_target is not None else s for s in found]

    monkeypatch.setattr(scored, "stored_scans", broke)
    rows = [r for r in scored.scored_scans(Store.open(out))[1] if r.true_target is not None]
    assert rows and all(r.verdict == UNSCANNABLE and r.backdoored and r.p_value is None for r in rows)
    for row in rows:  # the class named is the one the scorer reads off the evidence as measured
        before = measured[(row.key, row.scorer)]
        assert row.predicted_target == before.predicted_target and row.suspect_p == before.p_value
    monkeypatch.setattr(scored, "stored_scans", lambda store: broke(store, cut=True))
    assert all(r.predicted_target is None and r.suspect_p is None
               for r in scored.scored_scans(Store.open(out))[1] if r.true_target is not None)


def test_report_combine_names_bad_and_missing_scan_kinds(tmp_path, fake_plugins):
    out = tmp_path / "store"
    assert run_bench([*FAKE_SWEEP, "--out", out, "--quiet"]).exit_code == 0
    for text, message in (("ood/all", "name at least two scan kinds"),
                          ("ood/all+ood/all", "ood/all is named twice"),
                          ("ood/all+own/base", "'own/base' is not a scan kind DATA/CLASSES"),
                          ("ood/all+task/base", r"no model in .* has a scan of each of these kinds with a "
                                                r"reference \(its scans: ood/all\)")):
        result = run_bench(["report", out, "--combine", text, "--quiet"])
        assert result.exit_code != 0 and re.search(message, result.output), (text, result.output)
        assert not (out / "report").exists()  # nothing half-written


@pytest.mark.parametrize("kill_point", ["between write and rename", "while the cell is half-written"])
def test_resume_after_kill_redoes_only_the_killed_cell(tmp_path, fake_plugins, kill_point):
    out = tmp_path / "store"
    env = {**os.environ, "FAKE_BENCH_KILL_BEFORE": "fake-detector-fake-backdoor"}
    if kill_point == "while the cell is half-written":
        env = {**os.environ, "FAKE_BENCH_KILL_IN_TRAINING": "1", "FAKE_BENCH_KILL_BEFORE": "never"}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *FAKE_SWEEP, "--out", str(out), "--quiet"],
                            env=env, capture_output=True, text=True, timeout=1800)
    assert killed.returncode == -9, killed.stderr
    leftovers = list((out / ".tmp").iterdir())
    assert len(leftovers) == 1
    before = {kind: finished(out, kind) for kind in ("model", "reference", "scan")}
    assert len(before["reference"]) == 1  # the clean model's scan needed it first
    if kill_point == "between write and rename":
        assert (leftovers[0] / "cell.json").is_file()  # whole, but never published
        assert len(before["model"]) == 2 and len(before["scan"]) == 1
        expected_run, expected_reused = 1, 4
    else:
        assert not (leftovers[0] / "cell.json").exists()
        assert len(before["model"]) == 1 and len(before["scan"]) == 1
        expected_run, expected_reused = 2, 3
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*s/*/cell.json")}

    result = run_bench([*FAKE_SWEEP, "--out", out])
    assert result.exit_code == 0, result.output
    assert "deleted 1 half-written cell(s)" in result.output
    assert f"{expected_run} cells run, {expected_reused} reused from the store, 0 failed" in result.output
    assert_store_whole(out)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished cells untouched
    assert len(finished(out, "model")) == 2 and len(finished(out, "scan")) == 2
    assert len(mtimes) == expected_reused

    again = run_bench([*FAKE_SWEEP, "--out", out, "--quiet"])
    assert again.exit_code == 0 and "0 cells run, 5 reused" in again.output


def test_failing_cell_is_recorded_the_sweep_goes_on_and_the_report_lists_it(tmp_path, fake_plugins):
    out = tmp_path / "store"
    result = run_bench([*FAKE_SWEEP, "--attacks", "clean,fake-backdoor,badclip", "--attack-option",
                        "fake-backdoor.fail=true", "--attack-option", "badclip.epochs=1",
                        "--attack-option", "badclip.warmup_epochs=1", "--out", out])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "2 cell(s) failed" in result.output and "RuntimeError: fake attack failure" in result.output
    assert "5 cells run, 0 reused from the store, 2 failed" in result.output
    failures = Store.open(out).failures()
    assert sorted(f["kind"] for f in failures) == ["model", "scan"]
    assert all("fake-backdoor" in f["label"] for f in failures)
    assert "its model cell fake-backdoor/fake-shapes/seed 1 failed" in next(f for f in failures if f["kind"] == "scan")["error"]
    assert len(finished(out, "model")) == 2 and len(finished(out, "scan")) == 2  # clean and badclip, after the failure
    assert_store_whole(out)

    report = run_bench(["report", out])
    assert report.exit_code == 0, report.output
    data = json.loads((out / "report" / "report.json").read_text())
    assert {(f["kind"], f["label"]) for f in data["failures"]} == {
        ("model", "fake-backdoor/fake-shapes/seed 1"), ("scan", "fake-detector on fake-backdoor/fake-shapes/seed 1")}
    assert "RuntimeError: fake attack failure" in report.output
    # The report's numbers are those of the scans: AUROC and class counts recomputed here, per scorer, from the
    # verdicts each scan recorded with the same (default) scorer configs.
    cells = [json.loads(p.read_text()) for p in (out / "scans").glob("*/cell.json")]
    reports = [json.loads(p.read_text()) for p in (out / "scans").glob("*/scan/report.json")]
    truth = [c["true_target"] is not None for c in cells]
    assert [g["label"] for g in data["detectors"]] == ["fake-detector / ref-outlier", "fake-detector / ci"]
    for group in data["detectors"]:
        verdicts = [r["scorers"][group["scorer"]] for r in reports]
        assert group["model_level"]["auroc"] == pytest.approx(roc_auc_score(truth, [v["s_max"] for v in verdicts]))
        totals = next(r for r in group["class_level"]["attack"] if r["name"] == "all")
        flagged_target = sum(c["true_target"] in v["flagged"] for c, v in zip(cells, verdicts))
        assert totals["tp"] == flagged_target and totals["classes"] == 8
        assert totals["fp"] == sum(len(set(v["flagged"]) - {c["true_target"]}) for c, v in zip(cells, verdicts))
        verdict = group["verdict"]
        assert verdict["clean"] == 1 and verdict["false_positives"] == sum(v["backdoored"] for c, v in zip(cells, verdicts)
                                                                           if c["true_target"] is None)
        assert verdict["fpr_ci95"] == pytest.approx(list(clopper_pearson(verdict["false_positives"], 1)))
    assert {p.name for p in (out / "report").iterdir()} == {"report.md", "report.json", "report.html", "roc.png",
                                                            "anomaly_scores.png", ".clip-inspector-output.json"}
    assert (out / "report" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_store_and_report_refuse_foreign_folders(tmp_path, fake_plugins):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = run_bench([*FAKE_SWEEP, "--out", foreign])
    assert result.exit_code == 1 and "is not a ci-bench store" in result.output
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    result = run_bench(["report", foreign])
    assert result.exit_code == 1 and "is not a ci-bench store" in result.output and "Traceback" not in result.output


def test_missing_ray_names_the_extra(tmp_path, fake_plugins, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = run_bench([*FAKE_SWEEP, "--out", tmp_path / "store", "--executor", "ray"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "pip install 'clip-inspector[ray]'" in result.output


# --------------------------------------------------------------------------- local and Ray: same results

REAL_SWEEP = ["run", "--attacks", "clean", "--detectors", "ci", "--datasets", "tiny-palette", "--seeds", "3",
              "--shots", "1", "--attack-option", "clean.epochs=1", "--pool-sizes", "8", "--holdout", "8",
              "--threads", "1", "--quiet"]


def comparable(store_dir):
    """Every stored result without its timings and paths."""
    def strip(cell):
        return {k: v for k, v in cell.items() if k not in ("seconds", "scan_seconds", "cpu_seconds")}
    out = {}
    for kind in ("model", "reference", "scan"):
        for name in finished(store_dir, kind):
            folder = Path(store_dir) / f"{kind}s" / name
            out[name] = strip(json.loads((folder / "cell.json").read_text()))
            if kind == "scan":
                report = json.loads((folder / "scan" / "report.json").read_text())
                out[name]["classes"] = [{k: c[k] for k in ("name", "asr", "loss", "ssim", "score", "loss_trace")}
                                        for c in report["classes"]]
            if kind == "reference":
                result = json.loads((folder / "reference.json").read_text())["result"]
                out[name]["classes"] = [{k: c[k] for k in ("name", "asr", "loss", "loss_trace")}
                                        for c in result["classes"]]
    return out


def test_local_and_ray_executors_give_identical_results(tmp_path):
    pytest.importorskip("ray")
    local = run_bench([*REAL_SWEEP, "--out", tmp_path / "local"])
    assert local.exit_code == 0, local.output
    on_ray = run_bench([*REAL_SWEEP, "--out", tmp_path / "ray", "--executor", "ray", "--ray-cpus", "1"])
    assert on_ray.exit_code == 0, on_ray.output
    assert "3 cells run, 0 reused" in on_ray.output
    a, b = comparable(tmp_path / "local"), comparable(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 3
    differing = {(key, field) for key in a for field in set(a[key]) | set(b[key]) if a[key].get(field) != b[key].get(field)}
    assert not differing, [(k, f, a[k].get(f), b[k].get(f)) for k, f in sorted(differing)]  # same hash, metrics, evidence


def test_the_report_states_the_rule_once_for_scans_of_different_sizes():
    from types import SimpleNamespace

    from ci_core.harness.report.tables import common_rule

    rows = [SimpleNamespace(rule=f"p <= 0.01 (Bonferroni over {n} classes)") for n in (24, 36, 24)]
    assert common_rule(rows) == "p <= 0.01 (Bonferroni over n classes)"
    assert common_rule(rows[:1]) == "p <= 0.01 (Bonferroni over 24 classes)"
    assert common_rule([SimpleNamespace(rule=r) for r in ("s_max >= 2", "s_max >= 3")]) == "s_max >= 2; s_max >= 3"
    assert common_rule([SimpleNamespace(rule=None)]) is None


def test_one_scan_seed_shares_one_reference_across_model_seeds(tiny_backbone):
    plugins = registry()
    shared = plan_sweep(settings(seeds=(1, 2), clean_seeds=(5, 6)), tiny_backbone, plugins)
    assert len(shared.models) == 6 and len(shared.references) == 1  # 6 models of one dataset, one reference
    assert {c.spec.seed for c in shared.scans} == {SCAN_SEED} and shared.references[0].spec.seed == SCAN_SEED
    other = plan_sweep(settings(seeds=(1, 2), clean_seeds=(5, 6), scan_seed=7), tiny_backbone, plugins)
    assert {c.key for c in other.models} == {c.key for c in shared.models}  # the scan seed is no model's business
    assert not {c.key for c in other.scans + other.references} & {c.key for c in shared.scans + shared.references}
    per_model = plan_sweep(settings(seeds=(1, 2), clean_seeds=(5, 6), scan_seed=None), tiny_backbone, plugins)
    assert len(per_model.references) == 4 and {c.spec.seed for c in per_model.scans} == {1, 2, 5, 6}
    with pytest.raises(ConfigError, match="--scan-seed"):
        settings(scan_seed=-1)


def test_scans_of_the_base_classes_cross_in_beside_the_papers_candidates(tiny_backbone):
    plugins = registry()
    base_plan = plan_sweep(settings(candidate_classes=("all", "base")), tiny_backbone, plugins)
    paper = plan_sweep(settings(), tiny_backbone, plugins)
    assert set(keys(paper)) < set(keys(base_plan))  # the paper's scans keep their keys
    assert len(base_plan.scans) == 4 and len(base_plan.references) == 2
    base_scans = [c for c in base_plan.scans if c.spec.classes == "base"]
    base_classes, _ = base_new_split(plugins.get("dataset", "tiny-palette").open(None).classnames)
    references = {c.key: c for c in base_plan.references}
    assert {references[c.reference_key].spec.classnames for c in base_scans} == {tuple(base_classes)}
    assert all("base classes" in c.label for c in base_scans)
    with pytest.raises(ConfigError, match="--candidate-classes"):
        settings(candidate_classes=("seen",))
