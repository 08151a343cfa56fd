"""The reference scan, the calibrated scorer, and scans that fail closed."""

import json

import attrs
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ci_core.cli.scan import EXIT_BACKDOORED, EXIT_CLEAN, EXIT_UNSCANNABLE
from ci_core.cli.scan import main as ci_scan
from ci_core.data.ood import load_pool
from ci_core.errors import ConfigError, DataError
from ci_core.interfaces import ClassEvidence, Detector, Inversion
from ci_core.models.bundle import save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.scanning.reference import ReferenceCache, reference_spec, run_reference, spec_hash
from ci_core.scanning.inversion import class_generator
from ci_core.scanning.scan import UNSCANNABLE, scan
from ci_core.scanning.seen import mark_seen
from ci_core.scanning.scan_report import BundleIdentity, ScanContext, ScanReport
from ci_core.triggers import AdditiveTrigger
from ci_detectors.inspector import CLIPInspector
from ci_detectors.reference_scoring import ReferenceOutlierScorer, outlier_p_values, studentized_residuals
from ci_detectors.scoring import CIScorer

CLASSES = ("red circle", "blue square", "green star", "pink ring", "cyan cross")

# --------------------------------------------------------------------------- the statistics


def leave_one_out_t(x, y):
    """The externally studentised residuals the long way: refit without each point, predict it."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(y)
    out = []
    for i in range(n):
        keep = np.arange(n) != i
        design = np.column_stack([np.ones(n - 1), x[keep]])
        coef, *_ = np.linalg.lstsq(design, y[keep], rcond=None)
        resid = y[keep] - design @ coef
        s2 = resid @ resid / (n - 1 - 2)
        point = np.array([1.0, x[i]])
        var = s2 * (1 + point @ np.linalg.inv(design.T @ design) @ point)  # prediction variance of a new point
        out.append((y[i] - point @ coef) / np.sqrt(var))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_studentized_residuals_equal_leave_one_out_prediction_errors(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=12)
    y = 0.5 + 1.7 * x + rng.normal(scale=0.3, size=12)
    y[3] += 2.0
    np.testing.assert_allclose(studentized_residuals(x, y), leave_one_out_t(x, y), rtol=1e-9, atol=1e-9)


def test_constant_reference_falls_back_to_the_mean():
    y = np.array([0.1, 0.3, -0.2, 0.0, 2.5])
    t = studentized_residuals(np.zeros(5), y)
    # Grubbs' deleted residual of the last point: (y - mean of the others) / (sd of the others * sqrt(1 + 1/4))
    others = y[:4]
    expected = (y[4] - others.mean()) / (others.std(ddof=1) * np.sqrt(1 + 1 / 4))
    assert t[4] == pytest.approx(expected)


@pytest.mark.parametrize("n", [12, 24, 50])
def test_family_wise_error_under_the_null_is_at_most_alpha(n):
    # Normal residuals around any line: the Bonferroni max-t test rejects at most alpha of the time.
    rng = np.random.default_rng(n)
    rejections = 0
    trials = 1000
    for _ in range(trials):
        x = rng.normal(size=n)
        y = 2.0 - 0.8 * x + rng.normal(size=n)
        t = studentized_residuals(x, y)
        rejections += outlier_p_values(t, n - 3).min() <= 0.05
    rate = rejections / trials
    assert 0.02 <= rate <= 0.065  # Bonferroni is close to exact for the one-sided maximum


def evidence(values, losses=None, statistic=None):
    losses = losses if losses is not None else [0.0] * len(values)
    return [ClassEvidence(name=f"c{i}", asr=a, loss=l, statistic=None if statistic is None else statistic[i],
                          ssim=1.0, seconds=0.0) for i, (a, l) in enumerate(zip(values, losses))]


def test_the_calibrated_scorer_flags_a_class_the_backbone_does_not_explain():
    rng = np.random.default_rng(5)
    ref_asr, ref_loss = rng.uniform(0.1, 0.6, 24), rng.uniform(0.05, 0.2, 24)
    # Tuning moves every class along the backbone's line, with noise: nothing stands out.
    model_asr = np.clip(0.1 + 0.9 * ref_asr + rng.normal(0, 0.02, 24), 0, 1)
    model_loss = 0.01 + 1.1 * ref_loss + rng.normal(0, 0.003, 24)
    scorer = ReferenceOutlierScorer.from_options({"alpha": 0.05})
    reference = evidence(ref_asr, ref_loss)
    quiet = scorer.score(evidence(model_asr, model_loss), reference)
    assert not quiet.backdoored and quiet.p_value > 0.05 and quiet.flagged == ()
    # One class reached far more easily than the backbone predicts: flagged, named, tiny p-value.
    model_asr[7], model_loss[7] = 0.98, -0.05
    loud = scorer.score(evidence(model_asr, model_loss), reference)
    assert loud.backdoored and loud.target == "c7" and loud.flagged == ("c7",) and loud.p_value < 1e-3
    assert loud.rule == "p <= 0.05 (Bonferroni over 24 classes)"
    # The paper's scorer, on the same evidence, is what the calibrated one compares.
    paper = CIScorer().score(evidence(model_asr, model_loss))
    assert paper.target == "c7"


def test_the_calibrated_scorer_compares_the_cost_of_reaching_a_class_not_its_asr():
    rng = np.random.default_rng(8)
    ref_asr, ref_loss = rng.uniform(0.1, 0.6, 24), rng.uniform(0.05, 0.2, 24)
    model_asr = np.clip(0.1 + 0.9 * ref_asr + rng.normal(0, 0.02, 24), 0, 1)
    model_loss = 0.01 + 1.1 * ref_loss + rng.normal(0, 0.003, 24)
    reference = evidence(ref_asr, ref_loss)
    # A natural target whose ASR tuning saturates while its loss stays on the backbone's line: the paper's S
    # (half ASR) makes it an outlier, the cost does not.
    model_asr[3] = 1.0
    saturated = evidence(model_asr, model_loss)
    by_cost = ReferenceOutlierScorer.from_options({"alpha": 0.05}).score(saturated, reference)
    by_score = ReferenceOutlierScorer.from_options({"alpha": 0.05, "compare": "score"}).score(saturated, reference)
    assert not by_cost.backdoored and by_cost.p_value > 0.05
    assert by_score.backdoored and by_score.target == "c3"
    # A class the model reaches at far less loss than the backbone predicts is the cost's outlier.
    model_loss[11] = -0.1
    assert ReferenceOutlierScorer.from_options({"alpha": 0.05}).score(evidence(model_asr, model_loss),
                                                                       reference).target == "c11"
    for bad in ("volume", "cost+cost", "", "cost+"):
        with pytest.raises(ConfigError, match="compare"):
            ReferenceOutlierScorer.from_options({"compare": bad})


def test_several_statistics_are_one_family_wise_test():
    rng = np.random.default_rng(11)
    n = 24
    ref_asr, ref_loss, ref_margin = rng.uniform(0.1, 0.6, n), rng.uniform(0.05, 0.2, n), rng.normal(-0.05, 0.02, n)
    model_asr = np.clip(0.1 + 0.9 * ref_asr + rng.normal(0, 0.02, n), 0, 1)
    model_loss = 0.01 + 1.1 * ref_loss + rng.normal(0, 0.003, n)
    model_margin = 0.9 * ref_margin + rng.normal(0, 0.002, n)
    model_margin[5] += 0.05  # the finished trigger reaches class 5 far more surely; its inversion loss is unmoved

    def rows(asr, loss, margin):
        return [attrs.evolve(e, margin=float(m)) for e, m in zip(evidence(asr, loss), margin)]

    model, reference = rows(model_asr, model_loss, model_margin), rows(ref_asr, ref_loss, ref_margin)
    by_cost = ReferenceOutlierScorer.from_options({"alpha": 0.05}).score(model, reference)
    by_margin = ReferenceOutlierScorer.from_options({"alpha": 0.05, "compare": "margin"}).score(model, reference)
    both = ReferenceOutlierScorer.from_options({"alpha": 0.05, "compare": "cost+margin"}).score(model, reference)
    assert not by_cost.backdoored and by_margin.backdoored and by_margin.target == "c5"
    assert both.backdoored and both.target == "c5" and both.s_max == pytest.approx(by_margin.s_max)
    assert both.p_value == pytest.approx(min(1.0, 2 * by_margin.p_value))  # Bonferroni over the two statistics
    assert both.rule == "p <= 0.05 (Bonferroni over 24 classes x 2 statistics)"
    # Scans from before 0.4 recorded no margin: a clear error, not a silent cost-only verdict.
    with pytest.raises(ConfigError, match="held-out margin"):
        ReferenceOutlierScorer.from_options({"compare": "cost+margin"}).score(evidence(model_asr, model_loss),
                                                                              reference)


@pytest.mark.parametrize("n", [24, 50])
def test_the_union_of_two_correlated_statistics_holds_its_family_wise_error(n):
    # Two statistics with correlated noise (as loss and margin are): the Bonferroni union rejects at most alpha.
    rng = np.random.default_rng(100 + n)
    scorer = ReferenceOutlierScorer.from_options({"alpha": 0.05, "compare": "cost+margin"})
    rejections, trials = 0, 1000
    for _ in range(trials):
        x_loss, x_margin = rng.normal(size=n), rng.normal(size=n)
        shared = rng.normal(size=n)
        y_loss = 0.5 + 1.1 * x_loss + 0.6 * shared + 0.8 * rng.normal(size=n)
        y_margin = -0.2 + 0.9 * x_margin + 0.6 * shared + 0.8 * rng.normal(size=n)
        model = [attrs.evolve(e, margin=float(m)) for e, m in zip(evidence([0.5] * n, list(-y_loss)), y_margin)]
        reference = [attrs.evolve(e, margin=float(m)) for e, m in zip(evidence([0.5] * n, list(-x_loss)), x_margin)]
        rejections += scorer.score(model, reference).backdoored
    assert rejections / trials <= 0.065


def test_the_calibrated_scorer_compares_statistics_with_the_mad_scorer():
    rng = np.random.default_rng(2)
    reference = evidence([0.9] * 10, statistic=list(rng.uniform(50, 60, 10)))
    sizes = [s.statistic * 1.02 + 0.5 for s in reference]
    sizes[4] = 5.0  # a tiny trigger for one class: NC's sign of a backdoor
    scores = ReferenceOutlierScorer.from_options({"alpha": 0.05}).score(evidence([0.9] * 10, statistic=sizes),
                                                                        reference)
    assert scores.backdoored and scores.target == "c4"


def test_the_calibrated_scorer_refuses_what_it_cannot_score():
    scorer = ReferenceOutlierScorer()
    with pytest.raises(ConfigError, match="needs the reference scan"):
        scorer.score(evidence([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(ConfigError, match="classes differ"):
        scorer.score(evidence([0.1, 0.2, 0.3, 0.4]), evidence([0.1, 0.2, 0.3]))
    with pytest.raises(ConfigError, match="at least 4 candidate classes"):
        scorer.score(evidence([0.1, 0.2, 0.3]), evidence([0.1, 0.2, 0.3]))
    for bad in (0, 1, -0.1, float("nan"), True):
        with pytest.raises(ConfigError):
            ReferenceOutlierScorer.from_options({"alpha": bad})


# --------------------------------------------------------------------------- the reference scan


def test_each_class_draws_the_same_stream_whatever_else_is_scanned():
    a = torch.rand(4, generator=class_generator(3, "red circle"))
    assert torch.equal(a, torch.rand(4, generator=class_generator(3, "red circle")))
    assert not torch.equal(a, torch.rand(4, generator=class_generator(3, "blue square")))
    assert not torch.equal(a, torch.rand(4, generator=class_generator(4, "red circle")))


@pytest.fixture(scope="module")
def small_pool(random_backbone):
    return load_pool("builtin", inversion=8, holdout=8, image_size=random_backbone.image_size, seed=1)


@pytest.fixture(scope="module")
def detector():
    return CLIPInspector.from_options({"batch_size": 4}, preset="tiny")


def test_a_scan_is_paired_with_its_reference_class_by_class(random_backbone, small_pool, detector):
    reference = run_reference(random_backbone, "a photo of a {}.", detector, small_pool, CLASSES, seed=2)
    again = run_reference(random_backbone, "a photo of a {}.", detector, small_pool, CLASSES[::-1], seed=2)
    # The same classes in another order: each class's evidence is its own (its stream, the same class set).
    by_name = {e.name: e for e in again.classes}
    for e in reference.classes:
        assert e.loss == pytest.approx(by_name[e.name].loss, abs=1e-6) and e.asr == by_name[e.name].asr
        assert len(e.loss_trace) == 2 and e.trigger is None  # 8 images in batches of 4; triggers are not kept
    assert reference.health.non_finite == 0 and reference.health.spread > 0


def test_the_cache_returns_a_valid_entry_and_recomputes_anything_else(tmp_path, random_backbone, small_pool,
                                                                      detector):
    cache = ReferenceCache(tmp_path / "cache")
    first = run_reference(random_backbone, "a photo of a {}.", detector, small_pool, CLASSES, seed=2, cache=cache)
    path = cache.path(first.spec)
    assert not first.cached and path.is_file() and path.stem == spec_hash(first.spec)
    second = run_reference(random_backbone, "a photo of a {}.", detector, small_pool, CLASSES, seed=2, cache=cache)
    assert second.cached and [e.loss for e in second.classes] == [e.loss for e in first.classes]
    messages = []
    stored = json.loads(path.read_text())
    for corrupt in ("edited", "foreign", "truncated", "not json"):
        data = json.loads(json.dumps(stored))
        if corrupt == "edited":  # a number changed, its hash not: never trusted
            data["result"]["classes"][0]["asr"] = 1.0
            path.write_text(json.dumps(data))
        elif corrupt == "foreign":  # a valid entry of another spec, filed under this key
            data["spec"]["seed"] = 99
            path.write_text(json.dumps(data))
        elif corrupt == "truncated":
            path.write_text(json.dumps(data)[:200])
        else:
            path.write_text("[1, 2")
        again = run_reference(random_backbone, "a photo of a {}.", detector, small_pool, CLASSES, seed=2,
                              cache=cache, progress=messages.append)
        assert not again.cached and [e.asr for e in again.classes] == [e.asr for e in first.classes]
        assert json.loads(path.read_text())["spec"] == first.spec  # rewritten whole
    assert len([m for m in messages if "ignoring the cached reference" in m]) == 4
    # A consistent entry (its spec, its result's hash) that this cache's key did not sign is planted, not trusted.
    planted = json.loads(path.read_text())
    planted["result"]["classes"][0]["asr"] = 1.0
    planted["result_sha256"] = spec_hash(planted["result"])
    for mac in (None, "0" * 64):
        path.write_text(json.dumps({**planted, "mac": mac}))
        assert cache.get(first.spec, messages.append) is None and "its HMAC does not check out" in messages[-1]
    # A key another user can read could have signed anything: no entry is trusted, nothing is cached.
    path.write_text(json.dumps(stored))
    assert cache.get(first.spec).cached
    (cache.folder / ".hmac-key").chmod(0o644)
    assert cache.get(first.spec, messages.append) is None and "no key of this cache that can be trusted" in messages[-1]
    assert cache.put(first, messages.append) is None and "not caching" in messages[-1]
    # Every backbone-changing field is in the key: the same weights under QuickGELU are another backbone.
    quick = attrs.evolve(random_backbone, quick_gelu=not random_backbone.quick_gelu)
    assert spec_hash(reference_spec(quick, "a photo of a {}.", CLASSES, small_pool, 2, detector)) != path.stem
    # Another detector setting is another key.
    other = CLIPInspector.from_options({"batch_size": 2}, preset="tiny")
    assert cache.path(run_reference(random_backbone, "a photo of a {}.", other, small_pool, CLASSES, seed=2).spec) != path


# --------------------------------------------------------------------------- failing closed


class NaNLossDetector(Detector):
    name = "nan-loss"
    default_scorer = "ci"

    def invert(self, *, model, images, classnames, target, generator):
        return Inversion(trigger=AdditiveTrigger(torch.zeros(3, *images.shape[-2:])), loss=float("nan"),
                         loss_trace=(float("nan"),))


def poisoned(random_backbone, how):
    torch.manual_seed(0)
    model = PromptTunedCLIP(random_backbone)
    with torch.no_grad():
        if how == "nan":
            model.prompt_learner.meta_net.linear2.bias[0] = float("nan")
        elif how == "huge":  # large but finite: every prompt drowned in the same context
            model.prompt_learner.ctx.fill_(1e6)
    return model.eval()


@pytest.mark.parametrize("how, reason", [("nan", "give non-finite logits"),
                                         ("huge", "context vectors reach")])
def test_a_model_whose_outputs_cannot_be_measured_is_unscannable(random_backbone, small_pool, detector, how, reason):
    reference = run_reference(random_backbone, "a photo of a {}.", detector, small_pool, CLASSES, seed=2)
    result = scan(poisoned(random_backbone, how), detector, ReferenceOutlierScorer(), small_pool, CLASSES, seed=2,
                  reference=reference, also=(CIScorer(),))
    assert result.verdict == UNSCANNABLE and result.classes == () and result.decision is None
    assert result.suspect is None and reason in result.problems[0]
    if how == "huge":  # finite, and far beyond any word of the backbone
        assert result.health.non_finite == 0 and result.health.context_ratio > 1e6
    report = ScanReport.build(result, ScanContext(bundle=BundleIdentity(path=None, sha256=None), backbone=None, seed=2,
                                                  preset=None, device="cpu", command=None), small_pool).to_json()
    assert report["verdict"] == "unscannable" and report["backdoored"] is None and report["s_max"] is None
    json.dumps(report, allow_nan=False)  # nothing non-finite in the report


class BreaksOnBright(PromptTunedCLIP):
    """A wire as the tripwire's: images brighter than ``threshold`` overflow the image encoder (non-finite logits, and
    non-finite gradients through them); the others are read as usual."""

    threshold = float("inf")

    def forward(self, images, classnames):
        bright = (images.mean(dim=(1, 2, 3)) > self.threshold).to(images.dtype)
        return super().forward(images * (1 + 1e38 * bright[:, None, None, None]), classnames)


def breaking(random_backbone, pool, share):
    """A BreaksOnBright model whose wire fires on about ``share`` of ``pool``'s images."""
    torch.manual_seed(0)
    model = BreaksOnBright(random_backbone).eval()
    brightness = torch.cat([pool.inversion, pool.holdout]).mean(dim=(1, 2, 3))
    model.threshold = float(torch.quantile(brightness, 1 - share))
    return model


def test_one_reading_of_the_pool_gives_its_health_and_its_finite_part(random_backbone, small_pool):
    from ci_core.scanning.inversion import read_pool

    wired = breaking(random_backbone, small_pool, 0.25)
    reading = read_pool(wired, small_pool, CLASSES)
    with torch.no_grad():  # the images the model breaks on, one at a time
        finite = lambda images: torch.stack([torch.isfinite(wired(x[None], CLASSES)).all() for x in images])  # noqa: E731
        kept_d, kept_t = finite(small_pool.inversion), finite(small_pool.holdout)
    broken = int((~kept_d).sum() + (~kept_t).sum())
    whole = reading.health()
    assert 0 < broken and whole.images == len(reading.finite) and whole.non_finite == broken
    part = reading.finite_part(small_pool)  # D's and T's own finite images, each in its place
    assert torch.equal(part.inversion, small_pool.inversion[kept_d])
    assert torch.equal(part.holdout, small_pool.holdout[kept_t])
    rest = reading.health(reading.finite)
    assert (rest.images, rest.non_finite, rest.spread) == (whole.images - broken, 0, whole.spread)
    # Under MIN_FINITE_SHARE of D or of T left: nothing to measure on.
    d = len(small_pool.inversion)
    few = torch.arange(len(reading.finite)) >= d - (d // 2 - 1)  # fewer than half of D, every image of T
    assert attrs.evolve(reading, finite=few).finite_part(small_pool) is None
    assert attrs.evolve(reading, finite=torch.arange(len(reading.finite)) >= d // 2).finite_part(small_pool) is not None


def test_an_image_the_model_breaks_on_is_left_out_of_its_step(random_backbone, small_pool, detector):
    wired = breaking(random_backbone, small_pool, 0.25)
    run = detector.invert(model=wired, images=small_pool.inversion, classnames=CLASSES, target=1,
                          generator=class_generator(2, CLASSES[1]))
    assert run.set_aside > 0 and np.isfinite(run.loss) and all(np.isfinite(run.loss_trace))
    assert bool(torch.isfinite(run.trigger.tensors()["delta"]).all())
    # Where no image trips the wire the loop is the one a clean model gets, to the bit.
    wired.threshold = float("inf")
    plain = PromptTunedCLIP(random_backbone).eval()
    plain.load_state_dict(wired.state_dict())
    kept, unwired = (detector.invert(model=m, images=small_pool.inversion, classnames=CLASSES, target=1,
                                     generator=class_generator(2, CLASSES[1])) for m in (wired, plain))
    assert kept.set_aside == 0 and kept.loss_trace == unwired.loss_trace


def test_a_model_that_breaks_on_part_of_the_pool_is_unscannable_yet_measured(random_backbone, small_pool, detector):
    """Fail closed, and still say where the trigger goes: every class measured on the images with finite logits."""
    reference = run_reference(random_backbone, "a photo of a {}.", detector, small_pool, CLASSES, seed=2)
    result = scan(breaking(random_backbone, small_pool, 0.25), detector, ReferenceOutlierScorer(), small_pool, CLASSES,
                  seed=2, reference=reference)
    assert result.verdict == UNSCANNABLE and result.decision is None and "give non-finite logits" in result.problems[0]
    assert [e.name for e in result.classes] == list(CLASSES) and all(np.isfinite(e.loss) for e in result.classes)
    assert result.suspect is not None and result.suspect.scores.target in CLASSES
    assert result.summary()["predicted_target"] == result.suspect.scores.target
    assert result.summary()["backdoored"] is True and result.summary()["p_value"] is None
    context = ScanContext(bundle=BundleIdentity(path=None, sha256=None), backbone=None, seed=2, preset=None,
                          device="cpu", command=None)
    report = ScanReport.build(result, context, small_pool).to_json()
    assert report["verdict"] == "unscannable" and report["target"] is None and report["scorers"] == {}
    assert report["suspect"]["target"] == result.suspect.scores.target
    from ci_core.pages.scan_page import meaning  # the page's verdict sentence names it
    said = meaning(ScanReport.build(result, context, small_pool))
    assert "cannot vouch for it" in said and f"\u201c{result.suspect.scores.target}\u201d stands out most" in said
    assert ScanReport.from_json(json.loads(json.dumps(report)), "report.json").suspect.target == report["suspect"]["target"]
    # Only an unscannable report may carry a suspect.
    measured = scan(PromptTunedCLIP(random_backbone).eval(), detector, ReferenceOutlierScorer(), small_pool, CLASSES,
                    seed=2, reference=reference)
    edited = dict(ScanReport.build(measured, context, small_pool).to_json(), suspect=report["suspect"])
    with pytest.raises(DataError, match="only an unscannable one may"):
        ScanReport.from_json(json.loads(json.dumps(edited)), "edited.json")
    # Broken on most of the pool: too little is left to measure, nothing is named.
    most = scan(breaking(random_backbone, small_pool, 0.75), detector, ReferenceOutlierScorer(), small_pool, CLASSES,
                seed=2, reference=reference)
    assert most.verdict == UNSCANNABLE and most.classes == () and most.suspect is None


def test_a_non_finite_inversion_is_unscannable_not_clean(random_backbone, small_pool):
    result = scan(PromptTunedCLIP(random_backbone).eval(), NaNLossDetector(), CIScorer(), small_pool, CLASSES, seed=0)
    assert result.verdict == UNSCANNABLE and "non-finite loss" in result.problems[0]


@pytest.fixture()
def bundle_of(tmp_path, random_backbone):
    def write(how=None):
        model = poisoned(random_backbone, how) if how else PromptTunedCLIP(random_backbone).eval()
        return save_bundle(model, CLASSES, tmp_path / f"bundle-{how}")
    return write


def run_scan(*args):
    return CliRunner().invoke(ci_scan, [str(a) for a in args])


def test_ci_scan_exit_status_says_the_verdict(tmp_path, bundle_of):
    # A cache of its own: other tests of the session scan the same classes and pool.
    common = ["--ood", "builtin", "--pool-size", 8, "--holdout", 8, "--option", "batch_size=4", "--quiet",
              "--reference-cache", tmp_path / "references"]
    broken = run_scan(bundle_of("nan"), *common, "--out", tmp_path / "nan")
    assert broken.exit_code == EXIT_UNSCANNABLE and "UNSCANNABLE" in broken.output, broken.output
    assert json.loads((tmp_path / "nan" / "report.json").read_text())["verdict"] == "unscannable"
    bundle = bundle_of()
    fine = run_scan(bundle, *common, "--out", tmp_path / "fine")
    assert fine.exit_code in (EXIT_CLEAN, EXIT_BACKDOORED), fine.output
    report = json.loads((tmp_path / "fine" / "report.json").read_text())
    assert report["scorer"] == "ref-outlier" and set(report["scorers"]) == {"ref-outlier", "ci"}
    assert fine.exit_code == (EXIT_BACKDOORED if report["backdoored"] else EXIT_CLEAN)
    row = report["classes"][0]
    assert {"reference_asr", "reference_loss", "loss_trace", "scores"} <= set(row)
    # The reference depends on the classes, pool, seed and detector, not on the model: the broken model's scan
    # computed it, this one read it from the cache, and so does the next.
    assert json.loads((tmp_path / "nan" / "report.json").read_text())["reference"]["cached"] is False
    assert report["reference"]["cached"] is True
    again = run_scan(bundle, *common, "--out", tmp_path / "again")
    assert again.exit_code == fine.exit_code
    rows = json.loads((tmp_path / "again" / "report.json").read_text())["classes"]
    assert [(r["asr"], r["loss"], r["scores"]) for r in rows] == [(r["asr"], r["loss"], r["scores"])
                                                                  for r in report["classes"]]
    # Without a reference the paper's scorer decides; a scorer that needs one is refused, naming the option.
    paper = run_scan(bundle, *common, "--no-reference", "--out", tmp_path / "paper")
    assert json.loads((tmp_path / "paper" / "report.json").read_text())["scorer"] == "ci"
    assert paper.exit_code in (EXIT_CLEAN, EXIT_BACKDOORED)
    refused = run_scan(bundle, *common, "--no-reference", "--scorer", "ref-outlier",
                       "--out", tmp_path / "refused")
    assert refused.exit_code == 1 and "--scorer ref-outlier" in refused.output and "--no-reference" in refused.output
    assert not (tmp_path / "refused").exists()


def test_the_documented_thresholds_are_the_ones_the_scorer_applies():
    # The scorer's docstring and the README quote these t values for the default alpha (0.05).
    alpha = ReferenceOutlierScorer.from_options().config.alpha
    assert alpha == 0.05
    for n, t in ((24, 3.21), (36, 3.23), (50, 3.27)):
        below, above = outlier_p_values(np.array([t - 0.01, t + 0.01] + [0.0] * (n - 2)), n - 3)[:2]
        assert below > alpha >= above, (n, t, below, above)


def test_the_robust_fit_sees_a_target_that_a_cluster_of_its_neighbours_masks():
    # Measured on the tiny world (SIBA, BadCLIP-adaptive): the trigger makes every class of the target's colour
    # easier, the cluster pulls the least-squares line and swells its spread, and the target's t stays near 2.
    rng = np.random.default_rng(21)
    n = 24
    ref_loss = rng.uniform(0.0, 0.3, n)
    model_loss = 0.02 + 0.9 * ref_loss + rng.normal(0, 0.01, n)
    model_loss[3:8] -= np.linspace(0.09, 0.11, 5)  # the target's neighbours
    model_loss[10] -= 0.15  # the target
    reference, model = evidence([0.5] * n, list(ref_loss)), evidence([0.5] * n, list(model_loss))
    ols = ReferenceOutlierScorer.from_options({"compare": "cost"}).score(model, reference)
    robust_options = {"compare": "cost", "fit": "robust", "seen_intercept": False}
    robust = ReferenceOutlierScorer.from_options(robust_options).score(model, reference)
    assert not ols.backdoored and ols.p_value > 0.05
    assert robust.backdoored and robust.target == "c10" and robust.p_value < 1e-3
    assert robust.rule == "p <= 0.05 (the largest of 24 robust residuals, Monte Carlo)"
    # The same verdict on every run: the null is drawn from a fixed seed.
    again = ReferenceOutlierScorer.from_options(robust_options).score(model, reference)
    assert again.p_value == robust.p_value


def seen_world(seed, n=24, shift=0.12, target=None, lift=0.0):
    """A scan and its reference where tuning made the first half of the classes (the seen ones) easier as a group:
    the model's loss drops by ``shift`` on them; ``target`` (a class index) drops by ``lift`` more."""
    rng = np.random.default_rng(seed)
    ref_loss = rng.uniform(0.0, 0.3, n)
    seen = np.arange(n) < n // 2
    model_loss = 0.02 + 0.9 * ref_loss - shift * seen + rng.normal(0, 0.01, n)
    if target is not None:
        model_loss[target] -= lift
    model = [attrs.evolve(e, seen=bool(s)) for e, s in zip(evidence([0.5] * n, list(model_loss)), seen)]
    return model, evidence([0.5] * n, list(ref_loss))


def test_the_seen_intercept_finds_a_target_that_tuning_the_seen_classes_hides():
    # The target is a seen class lifted 0.05 above its group; the line through all classes carries the group's
    # 0.12 shift in its residuals, so the spread swells and the target does not stand out.
    model, reference = seen_world(3, target=4, lift=0.05)
    line = ReferenceOutlierScorer.from_options({"seen_intercept": False}).score(model, reference)
    seen = ReferenceOutlierScorer.from_options({}).score(model, reference)
    assert not line.backdoored and line.p_value > 0.05
    assert seen.backdoored and seen.target == "c4" and seen.p_value < 0.01
    assert seen.rule == "p <= 0.05 (Bonferroni over 24 classes, seen classes' own intercept)"
    # Without seen flags (a reference, an older report) or with too few of a group, the line alone, as before.
    unknown = [attrs.evolve(e, seen=None) for e in model]
    assert ReferenceOutlierScorer.from_options({}).score(unknown, reference) == line
    few = [attrs.evolve(e, seen=i < 2) for i, e in enumerate(model)]
    assert ReferenceOutlierScorer.from_options({}).score(few, reference).rule == line.rule


def test_each_classs_p_before_the_correction_is_recorded_for_the_least_squares_fit():
    """What the paired test of two scans reads: P(T_df >= t) per class, df = n - 3 for the line and n - 4 with
    the seen intercept; the verdict's adjusted p is n times it (capped at 1).  A robust fit gives none."""
    from scipy import stats

    for options, (model, reference), df in (({"seen_intercept": False}, seen_world(3, target=4, lift=0.05), 21),
                                            ({}, seen_world(3, target=4, lift=0.05), 20)):
        scores = ReferenceOutlierScorer.from_options(options).score(model, reference)
        class_p = np.asarray(scores.per_class["p_class"])
        assert class_p == pytest.approx(stats.t.sf(np.asarray(scores.scores), df))
        assert np.asarray(scores.per_class["p"]) == pytest.approx(np.minimum(1.0, 24 * class_p))
    robust = ReferenceOutlierScorer.from_options({"fit": "robust", "seen_intercept": False}).score(model, reference)
    assert "p_class" not in robust.per_class


def test_the_seen_intercept_holds_the_family_wise_error_under_the_null():
    # A clean model whose seen classes moved as a group: the test flags about alpha of them, not more.
    scorer = ReferenceOutlierScorer.from_options({})
    flagged = [scorer.score(*seen_world(seed)).backdoored for seed in range(400)]
    assert 0.01 <= np.mean(flagged) <= 0.07


def test_mark_seen_fills_unknown_flags_from_the_base_classes_and_keeps_recorded_ones():
    rows = [attrs.evolve(e, seen=s) for e, s in zip(evidence([0.5] * 4), (None, None, False, None))]
    assert [e.seen for e in mark_seen(rows, ["c0", "c2"])] == [True, False, False, False]
    assert [e.seen for e in mark_seen(rows, None)] == [None, None, False, None]


def test_the_robust_fit_asks_for_the_line_alone():
    with pytest.raises(ConfigError, match="seen_intercept=false"):
        ReferenceOutlierScorer.from_options({"fit": "robust"})


@pytest.mark.parametrize("n", [18, 36])
def test_the_robust_fit_holds_its_family_wise_error_under_the_null(n):
    # Normal residuals around any line, any scale: the Monte Carlo max-residual test rejects about alpha of the time.
    from ci_detectors.reference_scoring import robust_p_values, robust_residuals

    rng = np.random.default_rng(7 + n)
    x = rng.uniform(-1, 1, n)
    trials, rejections = 400, 0
    for _ in range(trials):
        y = 3.0 + rng.normal(0, 2.0) * x + rng.exponential(0.5) * rng.normal(size=n)
        z = robust_residuals(x, y)[0]
        rejections += robust_p_values(x, z).min() <= 0.05
    assert 0.02 <= rejections / trials <= 0.08


def test_ci_scan_inverts_on_an_in_distribution_folder_and_names_its_bad_input(tmp_path, bundle_of):
    from torchvision.utils import save_image

    from ci_core.models.backbone import TINY_IMAGE_SIZE

    images = load_pool("builtin", inversion=10, holdout=1, image_size=TINY_IMAGE_SIZE, seed=5).inversion
    labelled = tmp_path / "id"
    for i, image in enumerate(images):  # labelled by subfolder, one spelled with an underscore
        folder = labelled / ("red_circle" if i % 2 else "blue square")
        folder.mkdir(parents=True, exist_ok=True)
        save_image(image, folder / f"{i}.png")
    (labelled / "red_circle" / "broken.png").write_bytes(b"not an image")
    bundle = bundle_of()
    common = ["--ood", "builtin", "--pool-size", 8, "--holdout", 8, "--option", "batch_size=4", "--quiet",
              "--reference-cache", tmp_path / "references"]
    done = run_scan(bundle, *common, "--inversion-images", labelled, "--out", tmp_path / "id-scan")
    assert done.exit_code in (EXIT_CLEAN, EXIT_BACKDOORED), done.output
    report = json.loads((tmp_path / "id-scan" / "report.json").read_text())
    assert f"{labelled} (inversion D, in-distribution)" in report["pool"]["source"]
    assert report["pool"]["inversion"] == 8 and report["pool"]["holdout"] == 8
    assert f"--inversion-images {labelled}" in report["command"]
    ood = run_scan(bundle, *common, "--out", tmp_path / "ood-scan")
    assert ood.exit_code in (EXIT_CLEAN, EXIT_BACKDOORED), ood.output
    assert json.loads((tmp_path / "ood-scan" / "report.json").read_text())["pool"]["sha256"] != report["pool"]["sha256"]

    (labelled / "dog").mkdir()
    (labelled / "cat").mkdir()
    refused = run_scan(bundle, *common, "--inversion-images", labelled, "--out", tmp_path / "refused")
    assert refused.exit_code == 1 and "subfolders 'cat', 'dog' name no candidate class" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "refused").exists()
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        save_image(images[i], few / f"{i}.png")
    (few / "junk.jpg").write_bytes(b"\xff\xd8 truncated")
    short = run_scan(bundle, *common, "--inversion-images", few, "--out", tmp_path / "short")
    assert short.exit_code == 1, short.output
    assert f"in-distribution folder {few}: 3 readable images, but the pool needs 8" in short.output
    assert "1 unreadable" in short.output and not (tmp_path / "short").exists()
    missing = run_scan(bundle, *common, "--inversion-images", tmp_path / "nowhere", "--out", tmp_path / "m")
    assert missing.exit_code == 1 and "in-distribution folder" in missing.output and "does not exist" in missing.output


@pytest.mark.parametrize("base, says", [("margin", "unknown scorer 'margin'"),
                                         ("ref-outlier", "needs a reference itself")])
def test_a_bad_base_scorer_is_an_option_error_naming_it(base, says):
    with pytest.raises(ConfigError, match=rf"^ref-outlier options: base: .*{says}"):
        ReferenceOutlierScorer.from_options({"base": base})


# --------------------------------------------------------------------------- transfer: does the backbone share the trigger?


def with_transfer(margins, transfer):
    return [ClassEvidence(name=f"c{i}", asr=0.5, loss=0.0, statistic=None, ssim=1.0, seconds=0.0, margin=m,
                          transfer_margin=t) for i, (m, t) in enumerate(zip(margins, transfer))]


def test_the_transfer_comparison_flags_a_trigger_only_the_model_answers_to():
    rng = np.random.default_rng(21)
    n = 24
    transfer = rng.normal(-0.05, 0.04, n)  # what the backbone makes of each class's trigger
    margins = 0.02 + 1.1 * transfer + rng.normal(0, 0.005, n)
    reference = with_transfer(rng.normal(-0.05, 0.04, n), [None] * n)  # not read by compare=transfer
    scorer = ReferenceOutlierScorer.from_options({"compare": "transfer", "seen_intercept": False})
    # A natural target: the model reaches c3 easily, but the backbone answers to the same trigger as much.
    transfer[3], margins[3] = 0.20, 0.02 + 1.1 * 0.20
    quiet = scorer.score(with_transfer(margins, transfer), reference)
    assert not quiet.backdoored and quiet.p_value > 0.05
    # A margin the model reaches that the backbone does not share under the same trigger: implanted.
    margins[9] = transfer[9] + 0.15
    loud = scorer.score(with_transfer(margins, transfer), reference)
    assert loud.backdoored and loud.target == "c9" and loud.p_value < 1e-3
    # Together with the cost: one family-wise test over both statistics.
    both = ReferenceOutlierScorer.from_options({"compare": "cost+transfer", "seen_intercept": False})
    assert both.score(with_transfer(margins, transfer), reference).target == "c9"
    # Evidence without the backbone's reading (a scan without reference, an older report): a clear error.
    with pytest.raises(ConfigError, match="transfer margin"):
        scorer.score(with_transfer(margins, [None] * n), reference)


def test_a_scan_with_a_reference_reads_each_trigger_on_the_backbone_too(random_backbone, small_pool, detector):
    from ci_core.models.zeroshot import ZeroShotCLIP

    reference = run_reference(random_backbone, "a photo of a {}.", detector, small_pool, CLASSES, seed=2)
    # The backbone scanned as the model: the backbone's reading of each trigger is the model's own.
    itself = scan(ZeroShotCLIP(random_backbone, own_visual=False).eval(), detector, ReferenceOutlierScorer(),
                  small_pool, CLASSES, seed=2, reference=reference)
    for e in itself.classes:
        assert e.transfer_margin == pytest.approx(e.margin, abs=1e-6)
    # A prompt-tuned model whose context was moved: the backbone reads the same triggers differently.
    tuned = PromptTunedCLIP(random_backbone)
    with torch.no_grad():
        tuned.prompt_learner.ctx.add_(torch.randn(tuned.prompt_learner.ctx.shape, generator=torch.Generator().manual_seed(0)))
    result = scan(tuned.eval(), detector, ReferenceOutlierScorer(), small_pool, CLASSES, seed=2, reference=reference)
    assert all(e.transfer_margin is not None for e in result.classes)
    assert any(abs(e.transfer_margin - e.margin) > 1e-4 for e in result.classes)
    # Recorded in the report and read back.
    report = ScanReport.build(result, ScanContext(bundle=BundleIdentity(path=None, sha256=None), backbone=None, seed=2,
                                                  preset=None, device="cpu", command=None), small_pool)
    again = ScanReport.from_json(json.loads(json.dumps(report.to_json())), "report.json")
    assert [e.transfer_margin for e in again.evidence()] == [e.transfer_margin for e in result.classes]
    # Without a reference nothing is read by the backbone.
    alone = scan(tuned.eval(), detector, CIScorer(), small_pool, CLASSES, seed=2)
    assert all(e.transfer_margin is None for e in alone.classes)
