"""ci-scan --own-images: a second scan of the deployed classes on the auditor's own images, and one verdict from
both (Bonferroni over the scans' p-values, failing closed)."""

import json
import re

import attrs
import jsonschema
import pytest
import torch
from click.testing import CliRunner
from torchvision.utils import save_image

from ci_core.cli.scan import EXIT_BACKDOORED, EXIT_CLEAN, EXIT_UNSCANNABLE
from ci_core.cli.scan import main as ci_scan
from ci_core.data.ood import folder_classes, load_own_images, load_pool
from ci_core.errors import DataError
from ci_core.models.backbone import TINY_IMAGE_SIZE
from ci_core.models.bundle import save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
import numpy as np
from scipy import stats

from ci_core.scanning.combined import bonferroni_verdict, naming_scan, paired_evidence, paired_verdict
from ci_core.scanning.scan_report import read_scan_report
from ci_core.scanning.two_scan_report import two_scan_schema

CLASSES = ("red circle", "blue square", "green star", "pink ring", "cyan cross")
DEPLOYED = CLASSES[:4]


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("p_values, verdict, p, deciding", [
    ((0.30, 0.60), "clean", 0.60, 0),
    ((0.30, 0.01), "backdoored", 0.02, 1),
    ((0.30, 0.03), "clean", 0.06, 1),  # flagged alone at 0.05, not after the factor 2
    ((0.70, 0.90), "clean", 1.0, 0),  # capped at 1
    ((None, 0.40), "unscannable", 0.80, 1),  # fail closed: the other scan clears nothing it could not see
    ((None, 0.001), "backdoored", 0.002, 1),  # ... but a class flagged by the other decides
    ((None, None), "unscannable", None, None),
])
def test_two_scans_are_one_bonferroni_verdict_that_fails_closed(p_values, verdict, p, deciding):
    combined = bonferroni_verdict(p_values, alpha=0.05, label="ood+own")
    assert combined.verdict == verdict and combined.deciding == deciding
    assert combined.p_value == pytest.approx(p) if p is not None else combined.p_value is None
    assert combined.rule == "p <= 0.05, Bonferroni over the 2 scans ood+own"


@pytest.mark.parametrize("p_values, suspect_p, named", [
    ((None, 0.001), (0.5, None), 1),  # flagged by a measured scan: its class, whatever the other suspects
    ((None, 0.40), (0.001, None), 0),  # not flagged: the unscannable scan's suspect stands out more
    ((None, 0.40), (0.9, None), 1),
    ((None, None), (None, 0.2), 1),  # neither measurable as a whole: the one that measured every class
    ((None, None), (None, None), None),  # nothing measured: no class named
    ((0.30, 0.60), (None, None), 0),  # clean: the smaller p names the most anomalous class, as before
])
def test_the_class_named_counts_an_unscannable_scans_suspect(p_values, suspect_p, named):
    combined = bonferroni_verdict(p_values, alpha=0.05, label="ood+own")
    assert naming_scan(combined, p_values, suspect_p) == named


def _p_of(z):
    return {f"class {i}": float(stats.norm.sf(v)) for i, v in enumerate(z)}


def test_paired_test_flags_a_class_easy_in_both_scans_that_neither_flags_alone():
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=12) * 0.7, rng.normal(size=12) * 0.7
    first[5], second[5] = 2.6, 2.6  # p 0.0047 each: times 12 classes (x 2 scans) neither clears 0.05 alone
    p_first, p_second = _p_of(first), _p_of(second)
    alone = bonferroni_verdict([min(1, 12 * min(p_first.values())), min(1, 12 * min(p_second.values()))],
                               alpha=0.05, label="a+b")
    paired = paired_verdict([p_first, p_second], [None, None], alpha=0.05, label="a+b")
    assert alone.verdict == "clean"
    assert paired.verdict == "backdoored" and paired.target == "class 5" and paired.fallback is None
    evidence = paired.evidence
    # The combined score of a class is its two normal scores summed with the correlation of the *other* classes.
    for i in (0, 5):
        others = np.arange(12) != i
        rho = min(1.0, max(0.0, float(np.corrcoef(first[others], second[others])[0, 1])))
        assert evidence.correlation[i] == pytest.approx(rho)
        assert evidence.combined[i] == pytest.approx((first[i] + second[i]) / np.sqrt(2 * (1 + rho)), abs=1e-6)
    assert paired.p_value == pytest.approx(12 * stats.norm.sf(max(evidence.combined)))
    # The same class strong in one scan only is weaker evidence than in both.
    second[5] = 0.0
    assert paired_verdict([p_first, _p_of(second)], [None, None], alpha=0.05, label="a+b").p_value > paired.p_value


def test_paired_test_holds_its_level_when_a_clean_models_scans_correlate():
    """Clean models whose class quirks show in both scans (correlation 0.6, 18 classes): the leave-one-out
    correlation keeps the family-wise rate near alpha, where summing as if independent does not."""
    rng = np.random.default_rng(1)
    flagged = independent = 0
    models = 600
    for _ in range(models):
        shared = rng.normal(size=18)
        first = np.sqrt(0.6) * shared + np.sqrt(0.4) * rng.normal(size=18)
        second = np.sqrt(0.6) * shared + np.sqrt(0.4) * rng.normal(size=18)
        flagged += paired_verdict([_p_of(first), _p_of(second)], [None, None], alpha=0.05,
                                  label="a+b").verdict == "backdoored"
        independent += 18 * stats.norm.sf(((first + second) / np.sqrt(2)).max()) <= 0.05
    assert flagged / models <= 0.08 and independent / models >= 0.08


def test_paired_test_falls_back_to_bonferroni_when_a_scan_could_not_measure():
    measured = {"a": 0.5, "b": 0.01, "c": 0.3, "d": 0.9}
    paired = paired_verdict([None, measured], [None, 0.001], alpha=0.05, label="a+b")
    assert (paired.verdict, paired.p_value, paired.target, paired.evidence) == ("backdoored", 0.002, None, None)
    assert paired.fallback.deciding == 1
    assert paired_verdict([None, measured], [None, 0.4], alpha=0.05, label="a+b").verdict == "unscannable"
    with pytest.raises(ValueError, match="at least 4 classes scanned by both"):
        paired_evidence({"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}, {"a": 0.1, "b": 0.2, "x": 0.3})
    # Only the classes both scanned are paired, in the first scan's order; a p of 0 stays finite.
    evidence = paired_evidence({"x": 0.5, "d": 0.0, "c": 0.3, "b": 0.2, "a": 0.1}, measured)
    assert evidence.classes == ("d", "c", "b", "a") and np.isfinite(evidence.combined).all()


# --------------------------------------------------------------------------- the folder


def own_folder(root, classes=DEPLOYED, per_class=5, seed=3):
    images = load_pool("builtin", inversion=per_class * len(classes), holdout=1, image_size=TINY_IMAGE_SIZE,
                       seed=seed).inversion
    for i, image in enumerate(images):
        name = classes[i % len(classes)]
        folder = root / (name.replace(" ", "_") if i % len(classes) == 1 else name)  # either spelling
        folder.mkdir(parents=True, exist_ok=True)
        save_image(image, folder / f"{i}.png")
    return root


def test_the_own_folder_names_the_classes_scanned_in_candidate_order(tmp_path):
    folder = own_folder(tmp_path / "own", classes=("pink ring", "red circle", "blue square"))
    assert folder_classes(folder, CLASSES) == ("red circle", "blue square", "pink ring")
    pool, classes = load_own_images(folder, CLASSES, inversion=8, holdout=4, image_size=TINY_IMAGE_SIZE, seed=1)
    assert classes == ("red circle", "blue square", "pink ring")
    assert pool.inversion.shape[0] == 8 and pool.holdout.shape[0] == 4 and pool.files_found == 15
    again, _ = load_own_images(folder, CLASSES, inversion=8, holdout=4, image_size=TINY_IMAGE_SIZE, seed=1)
    assert again.digest() == pool.digest()  # drawn by the seed
    # D and T are different images of the folder
    assert not any(torch.equal(a, b) for a in pool.inversion for b in pool.holdout)


@pytest.mark.parametrize("spoil, message", [
    (lambda f: (f / "dog").mkdir(), "subfolders 'dog' name no candidate class"),
    (lambda f: save_image(torch.rand(3, 8, 8), f / "loose.png"), "1 image file(s) ('loose.png') lie outside the class"),
    (lambda f: (f / "cyan cross").mkdir(), "the subfolders of 'cyan cross' hold no images"),
    (lambda f: (f / "cyan_cross").symlink_to(f / "pink ring"), "subfolders 'cyan_cross' are links"),
])
def test_a_bad_own_folder_is_refused_naming_what_is_wrong(tmp_path, spoil, message):
    folder = own_folder(tmp_path / "own")
    spoil(folder)
    with pytest.raises(DataError, match=rf"own-images folder {re.escape(str(folder))}: .*{re.escape(message)}"):
        folder_classes(folder, CLASSES)


def test_a_class_name_that_is_a_path_finds_nothing_outside_the_folder(tmp_path):
    # The bundle names the candidate classes: '../x' must not reach the folder's neighbour.
    folder = own_folder(tmp_path / "own", classes=("red circle", "blue square"))
    own_folder(tmp_path / "x", classes=("pink ring",))
    assert folder_classes(folder, ("red circle", "blue square", "../x", "..")) == ("red circle", "blue square")


def test_an_own_folder_without_class_subfolders_or_images_enough_says_so(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="has no class subfolders: it needs one subfolder of images per class"):
        folder_classes(tmp_path / "flat", CLASSES)
    folder = own_folder(tmp_path / "own", per_class=2)
    with pytest.raises(DataError, match=r"own-images folder .*: 8 readable images, but the pool needs 12"):
        load_own_images(folder, CLASSES, inversion=8, holdout=4, image_size=TINY_IMAGE_SIZE, seed=1)


# --------------------------------------------------------------------------- ci-scan


@pytest.fixture()
def bundle(tmp_path, random_backbone):
    def write(nan=False):
        if (tmp_path / f"bundle-{nan}").exists():
            return tmp_path / f"bundle-{nan}"
        torch.manual_seed(0)
        model = PromptTunedCLIP(random_backbone).eval()
        if nan:
            with torch.no_grad():
                model.prompt_learner.meta_net.linear2.bias[0] = float("nan")
        return save_bundle(model, CLASSES, tmp_path / f"bundle-{nan}")
    return write


def run_scan(*args):
    return CliRunner().invoke(ci_scan, [str(a) for a in args])


def common(tmp_path):
    return ["--ood", "builtin", "--pool-size", 8, "--holdout", 8, "--own-pool-size", 8, "--own-holdout", 4,
            "--option", "batch_size=4", "--quiet", "--reference-cache", tmp_path / "references"]


def test_ci_scan_judges_a_model_by_both_scans(tmp_path, bundle):
    own = own_folder(tmp_path / "own")
    out = tmp_path / "scan"
    done = run_scan(bundle(), *common(tmp_path), "--own-images", own, "--out", out)
    assert done.exit_code in (EXIT_CLEAN, EXIT_BACKDOORED), done.output
    verdict = json.loads((out / "verdict.json").read_text())
    jsonschema.Draft202012Validator(two_scan_schema()).validate(verdict)
    ood, mine = read_scan_report(out / "ood"), read_scan_report(out / "own")
    assert ood.classnames == CLASSES and mine.classnames == DEPLOYED  # the folder's classes, in candidate order
    assert f"{own} (own images of 4 classes: D and T)" == mine.pool.source
    assert (mine.pool.inversion, mine.pool.holdout) == (8, 4) and (ood.pool.inversion, ood.pool.holdout) == (8, 8)
    assert mine.reference is not None and mine.reference.key != ood.reference.key  # each against its own reference
    smaller = min((ood, mine), key=lambda r: r.decision.p_value)
    assert verdict["p_value"] == pytest.approx(min(1.0, 2 * smaller.decision.p_value))
    assert verdict["target"] == smaller.decision.target
    assert verdict["deciding_scan"] == ("ood" if smaller is ood else "own")
    assert [s["p_value"] for s in verdict["scans"]] == [ood.decision.p_value, mine.decision.p_value]
    assert done.exit_code == (EXIT_BACKDOORED if verdict["p_value"] <= 0.05 else EXIT_CLEAN)
    assert f"--own-images {own} --own-pool-size 8 --own-holdout 4 --combine bonferroni" in verdict["command"]
    assert verdict["combination"] == "bonferroni"
    assert ood.command == verdict["command"]
    for name in ("ood", "own"):  # each scan is a complete scan folder
        assert (out / name / "report.html").is_file() and any((out / name / "triggers").glob("*.png"))
    page = (out / "report.html").read_text()
    assert 'href="ood/report.html"' in page and 'href="own/report.html"' in page
    assert page.count("data:image/png;base64,") == 2  # both evidence figures, embedded
    assert f"report: {out / 'report.html'}" in done.output and "own scan: p = " in done.output
    with pytest.raises(DataError, match="holds two scans .*: read one of them"):  # e.g. to ci-repair
        read_scan_report(out)

    # A model neither scan can measure is unscannable, with no p-value.
    broken = run_scan(bundle(nan=True), *common(tmp_path), "--own-images", own, "--out", tmp_path / "nan")
    assert broken.exit_code == EXIT_UNSCANNABLE, broken.output
    verdict = json.loads((tmp_path / "nan" / "verdict.json").read_text())
    assert verdict["verdict"] == "unscannable" and verdict["p_value"] is None and verdict["target"] is None
    assert "UNSCANNABLE: neither scan could measure the model" in broken.output


def test_ci_scan_reads_both_scans_by_the_paired_test(tmp_path, bundle):
    own = own_folder(tmp_path / "own")
    out = tmp_path / "paired"
    done = run_scan(bundle(), *common(tmp_path), "--own-images", own, "--combine", "paired", "--out", out)
    assert done.exit_code in (EXIT_CLEAN, EXIT_BACKDOORED), done.output
    verdict = json.loads((out / "verdict.json").read_text())
    jsonschema.Draft202012Validator(two_scan_schema()).validate(verdict)
    ood, mine = read_scan_report(out / "ood"), read_scan_report(out / "own")
    class_p = [dict(zip(r.classnames, r.decision.per_class["p_class"])) for r in (ood, mine)]
    expected = paired_verdict(class_p, [ood.decision.p_value, mine.decision.p_value], alpha=0.05, label="ood+own")
    assert verdict["combination"] == "paired" and verdict["rule"] == expected.rule
    assert verdict["p_value"] == pytest.approx(expected.p_value) and verdict["target"] == expected.target
    assert verdict["target"] in DEPLOYED and verdict["deciding_scan"] in ("ood", "own")
    assert "--combine paired" in verdict["command"] and "the same class in both scans" in done.output
    # Asked without a second scan, or of a scorer that gives no per-class p, it says why before any work.
    alone = run_scan(bundle(), "--ood", "builtin", "--combine", "paired")
    assert alone.exit_code == 2 and "--combine paired reads two scans of the model: give --own-images" in alone.output
    robust = run_scan(bundle(), *common(tmp_path), "--own-images", own, "--combine", "paired",
                      "--scorer-option", "fit=robust", "--scorer-option", "seen_intercept=false")
    assert robust.exit_code == 2 and "fit=ols only (got fit=robust)" in robust.output


def test_ci_scan_reads_each_scan_with_its_settings_variance_prior(tmp_path, bundle):
    """--variance-prior: each scan is read with the prior of its own setting (the OOD pool, the own images); a
    book that lacks a scan's setting is an error before any work."""
    from ci_core.scanning.variance_prior import PriorBook, VariancePrior, prior_setting
    from ci_detectors.reference_scoring import ReferenceOutlierConfig

    own = own_folder(tmp_path / "own")
    first = run_scan(bundle(), *common(tmp_path), "--own-images", own, "--out", tmp_path / "plain")
    assert first.exit_code in (EXIT_CLEAN, EXIT_BACKDOORED), first.output
    statistic = ReferenceOutlierConfig().statistic()
    specs = [json.loads(f.read_text())["spec"] for f in sorted((tmp_path / "references").glob("*.json"))]
    settings = {("own" if spec["classnames"] == list(DEPLOYED) else "ood"): spec for spec in specs}
    priors = {"ood": VariancePrior(variance=1e-4, df=20.0, models=6),
              "own": VariancePrior(variance=2e-4, df=None, models=5)}
    book = tmp_path / "prior.json"
    PriorBook({kind: (prior_setting(settings[kind], kind, statistic), prior, tuple(f"m{i}" for i in range(prior.models)))
               for kind, prior in priors.items()}).write(book)
    out = tmp_path / "moderated"
    done = run_scan(bundle(), *common(tmp_path), "--own-images", own, "--variance-prior", book, "--out", out)
    assert done.exit_code in (EXIT_CLEAN, EXIT_BACKDOORED), done.output
    for kind in ("ood", "own"):
        report = json.loads((out / kind / "report.json").read_text())
        assert report["scorer_config"]["variance_prior"] == priors[kind].to_json()
        assert f"moderated by the prior of {priors[kind].models} clean tuned models" in report["rule"]
    assert "--variance-prior" in json.loads((out / "verdict.json").read_text())["command"]
    # A book without the own-images scan's setting: named, before any scan, nothing written.
    PriorBook({"ood": (prior_setting(settings["ood"], "ood", statistic), priors["ood"],
                       tuple(f"m{i}" for i in range(6)))}).write(book)
    done = run_scan(bundle(), *common(tmp_path), "--own-images", own, "--variance-prior", book,
                    "--out", tmp_path / "lacking")
    assert done.exit_code == 1 and "holds no variance prior for this scan's setting (4 classes" in done.output
    assert "own pool |D|=8 |T|=4" in done.output and not (tmp_path / "lacking").exists()
    done = run_scan(bundle(), "--ood", "builtin", "--no-reference", "--variance-prior", book)
    assert done.exit_code == 2 and "drop --no-reference" in done.output


@pytest.mark.parametrize("extra, message", [
    (["--no-reference"], "--own-images judges the model by the p-values of its two scans"),
    (["--scorer", "ci"], "drop --scorer ci"),
])
def test_two_scans_need_the_calibrated_scorer(tmp_path, bundle, extra, message):
    done = run_scan(bundle(), *common(tmp_path), "--own-images", own_folder(tmp_path / "own"), *extra)
    assert done.exit_code == 2 and message in done.output


def test_bad_own_images_fail_before_any_work(tmp_path, bundle):
    without = run_scan(bundle(), "--ood", "builtin", "--own-pool-size", 8)
    assert without.exit_code == 2 and "give --own-images" in without.output
    few = own_folder(tmp_path / "few", classes=DEPLOYED[:3])  # 3 classes: too few for the calibrated scorer
    done = run_scan(bundle(), *common(tmp_path), "--own-images", few, "--out", tmp_path / "few-scan")
    assert done.exit_code == 1 and "needs at least 4 candidate classes, got 3" in done.output
    assert not (tmp_path / "few-scan").exists() and "Traceback" not in done.output
    short = own_folder(tmp_path / "short", per_class=2)
    done = run_scan(bundle(), *common(tmp_path), "--own-images", short, "--out", tmp_path / "short-scan")
    assert done.exit_code == 1 and f"own-images folder {short}: 8 readable images, but the pool needs 12" in done.output
    assert not (tmp_path / "short-scan").exists()


# --------------------------------------------------------------------------- the page, in a browser


def test_the_two_scan_page_in_headless_chromium(tmp_path, bundle):
    from test_scan_report import DOM, HOSTILE, browse

    from ci_core.pages.two_scan_page import write_two_scan_page
    from ci_core.scanning.two_scan_report import TwoScanReport

    out = tmp_path / "scan"
    done = run_scan(bundle(), *common(tmp_path), "--own-images", own_folder(tmp_path / "own"), "--out", out)
    assert done.exit_code in (EXIT_CLEAN, EXIT_BACKDOORED), done.output
    verdict = json.loads((out / "verdict.json").read_text())
    dom = DOM(browse(out / "report.html", "--dump-dom"))
    text = " ".join(" ".join(dom.text).split())
    assert dom.title.startswith(verdict["verdict"].upper()) and verdict["rule"] in text
    assert f"{verdict['p_value']:.3f}" in text and verdict["target"] in text
    rows = dom.tables["scans"]
    assert [row[3] for row in rows[1:]] == [f"{s['p_value']:.3f}" for s in verdict["scans"]]
    assert [row[1] for row in rows[1:]] == ["5", "4"] and all(len(row) == 6 for row in rows)
    assert [a["href"] for tag, a in dom.elements if tag == "a"] == ["ood/report.html", "own/report.html"]
    images = [a["src"] for tag, a in dom.elements if tag == "img"]
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not any(tag == "script" for tag, _ in dom.elements)

    # The paired reading of the same scans says what it asked, per scan and in the facts.
    reports = {name: read_scan_report(out / name) for name in ("ood", "own")}
    paired = TwoScanReport.build(list(reports.items()), alpha=0.05, context=context_of(reports["ood"]),
                                 combination="paired")
    write_two_scan_page(paired, reports, out)
    text = " ".join(" ".join(DOM(browse(out / "report.html", "--dump-dom")).text).split())
    assert paired.rule in text and text.count("asks whether the same class is easy to reach in both scans") == 2
    assert "the scan where that class stands out more" in text and paired.target in text

    # The provider's class names and the auditor's paths are inert text on it too.
    hostile = TwoScanReport.build(list(reports.items()), alpha=0.05, context=attrs.evolve(
        context_of(reports["ood"]), bundle=attrs.evolve(reports["ood"].bundle, path=HOSTILE[1])))
    hostile = attrs.evolve(hostile, target=HOSTILE[0], scans=tuple(
        attrs.evolve(s, target=HOSTILE[3], pool_source=HOSTILE[2]) for s in hostile.scans))
    write_two_scan_page(hostile, reports, out)
    dom = DOM(browse(out / "report.html", "--dump-dom"))
    assert dom.title.endswith(f"two scans of {HOSTILE[1]}")
    assert not any(tag == "script" or "onerror" in a or "data-pwned" in a for tag, a in dom.elements)
    assert [a["href"] for tag, a in dom.elements if tag == "a"] == ["ood/report.html", "own/report.html"]
    assert all(len(row) == 6 for row in dom.tables["scans"])


def context_of(report):
    from ci_core.scanning.scan_report import ScanContext

    return ScanContext(bundle=report.bundle, backbone=report.backbone, seed=report.seed, preset=report.preset,
                       device=report.device, command=report.command)


def test_ci_bench_images_writes_a_datasets_base_classes_as_an_own_images_folder(tmp_path):
    from ci_core.cli.bench import main as ci_bench
    from ci_core.data.labeled import base_new_split
    from ci_core.plugins import open_dataset

    out = tmp_path / "own"
    done = CliRunner().invoke(ci_bench, ["images", "tiny-palette", "--per-class", 2, "--out", str(out)])
    assert done.exit_code == 0, done.output
    classnames = open_dataset("tiny-palette", None).classnames
    base, _ = base_new_split(classnames)
    assert folder_classes(out, classnames) == base
    assert all(len(list((out / name).glob("*.png"))) == 2 for name in base)
    assert f"{2 * len(base)} val images of {len(base)} base classes of tiny-palette" in done.output
    again = CliRunner().invoke(ci_bench, ["images", "tiny-palette", "--classes", "all", "--per-class", 1,
                                          "--out", str(out)])  # its own earlier output: replaced whole
    assert again.exit_code == 0 and folder_classes(out, classnames) == classnames
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused = CliRunner().invoke(ci_bench, ["images", "tiny-palette", "--out", str(tmp_path / "mine")])
    assert refused.exit_code == 1 and "is not a folder this toolkit wrote" in refused.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("dataset, per_class", [("tiny-palette", 16), ("tiny-colorshapes", 12)])
def test_ci_bench_images_writes_enough_for_a_default_own_scan(tmp_path, dataset, per_class):
    """12 base classes need 16 images each for |D| + |T| = 128 + 64 (at 12 each the scan would refuse 144)."""
    from ci_core.cli.bench import main as ci_bench
    from ci_core.learning.protocol import POOL_SIZES
    from ci_core.plugins import open_dataset

    out = tmp_path / "own"
    done = CliRunner().invoke(ci_bench, ["images", dataset, "--out", str(out)])
    assert done.exit_code == 0, done.output
    classes = folder_classes(out, open_dataset(dataset, None).classnames)
    assert all(len(list((out / name).glob("*.png"))) == per_class for name in classes)
    inversion, holdout = POOL_SIZES["tiny"]
    pool, _ = load_own_images(out, classes, inversion=inversion, holdout=holdout, image_size=TINY_IMAGE_SIZE, seed=0)
    assert (len(pool.inversion), len(pool.holdout)) == (inversion, holdout)


@pytest.mark.parametrize("name", ["a/b", "..", "", "tab\there", "c\\d"])
def test_a_class_that_cannot_name_a_folder_is_refused_before_writing(tmp_path, name):
    from ci_core.data.labeled import LabeledImages, write_labelled_folder

    images = LabeledImages(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), ("red circle", name))
    with pytest.raises(DataError, match="cannot name a folder"):
        write_labelled_folder(images, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_ci_repair_takes_the_own_scans_trigger_judged_by_the_pairs_verdict(tmp_path, bundle):
    from ci_core.cli.repair import main as ci_repair

    out = tmp_path / "scan"
    done = run_scan(bundle(), *common(tmp_path), "--own-images", own_folder(tmp_path / "own"), "--out", out)
    assert done.exit_code in (EXIT_CLEAN, EXIT_BACKDOORED), done.output
    verdict = json.loads((out / "verdict.json").read_text())
    data = tmp_path / "data"
    for split, names in (("train", CLASSES[:3]), ("test", CLASSES)):
        for name in names:
            own_folder(data / split, classes=(name,), per_class=1)
    args = [bundle(), "--report", out, "--data", data, "--shots", 1, "--option", "epochs=1", "--quiet"]
    repaired = CliRunner().invoke(ci_repair, [str(a) for a in
                                              [*args, "--out", tmp_path / "r", "--force", "--json", tmp_path / "r.json"]])
    assert repaired.exit_code == 0, repaired.output
    record = json.loads((tmp_path / "r.json").read_text())  # the own scan's trigger for its top class
    own_target = next(s["target"] for s in verdict["scans"] if s["name"] == "own")
    assert record["scan_target"] == record["repair_trigger_class"] == own_target
    assert record["report"] == f"{out} (its own scan: the scan on your own images)"
    assert verdict["verdict"] == "clean"  # the random-weight model: the pair's verdict decides the refusal
    refused = CliRunner().invoke(ci_repair, [str(a) for a in [*args, "--out", tmp_path / "r2"]])
    assert refused.exit_code == 1 and "the scan found this model clean" in refused.output
    assert f"p = {verdict['p_value']:.3g}" in refused.output
    # Where the own scan could not measure the model, the OOD scan's trigger; the pair is then unscannable.
    ood = next(s for s in verdict["scans"] if s["name"] == "ood")
    unmeasured = dict(verdict, verdict="unscannable", backdoored=True, p_value=min(1.0, 2 * ood["p_value"]),
                      target=ood["target"], deciding_scan="ood",
                      scans=[s if s is ood else dict(s, verdict="unscannable", p_value=None, target=None)
                             for s in verdict["scans"]])
    (out / "verdict.json").write_text(json.dumps(unmeasured))
    refused = CliRunner().invoke(ci_repair, [str(a) for a in [*args, "--out", tmp_path / "r4"]])
    assert refused.exit_code == 1 and "one scan could not measure the model" in refused.output
    forced = CliRunner().invoke(ci_repair, [str(a) for a in [*args, "--out", tmp_path / "r5", "--force", "--json",
                                                             tmp_path / "r5.json"]])
    assert forced.exit_code == 0, forced.output
    record = json.loads((tmp_path / "r5.json").read_text())
    assert record["repair_trigger_class"] == ood["target"] and "its ood scan: the own scan could not" in record["report"]
    # A pair read by the paired test: the own scan's trigger for the class the test names.
    own = next(s for s in verdict["scans"] if s["name"] == "own")
    named = next(name for name in DEPLOYED if name != own["target"])
    (out / "verdict.json").write_text(json.dumps(dict(verdict, combination="paired", target=named)))
    forced = CliRunner().invoke(ci_repair, [str(a) for a in [*args, "--out", tmp_path / "r6", "--force", "--json",
                                                             tmp_path / "r6.json"]])
    assert forced.exit_code == 0, forced.output
    record = json.loads((tmp_path / "r6.json").read_text())
    assert record["repair_trigger_class"] == named and "for the class the paired test names" in record["report"]
    # Neither scan measured the model as a whole, but the own scan measured every class on the images it did not
    # break on: forced, the own scan's suspect's trigger.
    own_report = read_scan_report(out / "own" / "report.json")
    broken = attrs.evolve(own_report, verdict="unscannable", scorers=(), suspect=own_report.decision,
                          unscannable_reasons=("its outputs are not finite on 2 of 8 pool images",))
    (out / "own" / "report.json").write_text(json.dumps(broken.to_json()))
    neither = dict(verdict, verdict="unscannable", backdoored=True, p_value=None, deciding_scan=None,
                   target=own["target"], scans=[dict(s, verdict="unscannable", p_value=None) for s in verdict["scans"]])
    (out / "verdict.json").write_text(json.dumps(neither))
    refused = CliRunner().invoke(ci_repair, [str(a) for a in [*args, "--out", tmp_path / "r7"]])
    assert refused.exit_code == 1 and "could not measure the model as a whole" in " ".join(refused.output.split())
    forced = CliRunner().invoke(ci_repair, [str(a) for a in [*args, "--out", tmp_path / "r7", "--force", "--json",
                                                             tmp_path / "r7.json"]])
    assert forced.exit_code == 0, forced.output
    record = json.loads((tmp_path / "r7.json").read_text())
    assert record["repair_trigger_class"] == own["target"] and "its suspect" in record["report"]
    # An edited verdict.json is refused, not half-believed.
    edited = dict(verdict, backdoored=not verdict["backdoored"])
    (out / "verdict.json").write_text(json.dumps(edited))
    refused = CliRunner().invoke(ci_repair, [str(a) for a in [*args, "--out", tmp_path / "r3", "--force"]])
    assert refused.exit_code == 1 and "disagree (an edited file?)" in refused.output


def test_a_paired_verdict_that_fell_back_to_bonferroni_says_so_scan_by_scan():
    """Where a scan could not measure the model the paired test leaves the Bonferroni rule to decide; the measured
    scan's sentence on the page must say so, not that both scans were read together."""
    from types import SimpleNamespace

    from ci_core.pages.two_scan_page import scan_sentence
    from ci_core.scanning.scan import UNSCANNABLE
    from ci_core.scanning.two_scan_report import ScanSummary, TwoScanReport

    measured = ScanSummary(name="ood", verdict="clean", p_value=0.3, target="red circle", classes=4, pool_source=None)
    broken = ScanSummary(name="own", verdict=UNSCANNABLE, p_value=None, target=None, classes=4, pool_source=None)
    as_pair = TwoScanReport.read_as_pair.fget
    assert not as_pair(SimpleNamespace(combination="paired", scans=(measured, broken)))
    assert as_pair(SimpleNamespace(combination="paired", scans=(measured, measured)))
    fell_back = scan_sentence(measured, 2, as_pair(SimpleNamespace(combination="paired", scans=(measured, broken))))
    assert "multiplies the smaller p by 2" in fell_back and "both scans" not in fell_back
    assert "the same class is easy to reach in both scans" in scan_sentence(measured, 2, True)
    assert scan_sentence(broken, 2, False) == "This scan could not measure the model:"
    # Unscannable, yet every class measured on the images it did not break on: the page names its suspect.
    suspect = attrs.evolve(broken, target="green star", suspect_p=0.004)
    said = scan_sentence(suspect, 2, False)
    assert "could not measure the model as a whole" in said and "\u201cgreen star\u201d" in said
    assert "p = 0.004 on those images" in said
