"""The variance prior (ci_core.scanning.variance_prior): its fit, the scorer's moderated t, the book file, and the
harness and ci-scan paths that read it."""

import json
import math

import numpy as np
import pytest
from scipy import special

from ci_core.errors import ConfigError
from ci_core.interfaces import ClassEvidence
from ci_core.keys import spec_hash
from ci_core.scanning.variance_prior import (MIN_PRIOR_MODELS, PriorBook, VariancePrior, build_book,
                                             fit_variance_prior, prior_setting)
from ci_detectors.reference_scoring import ReferenceOutlierScorer, residual_variance, studentized_residuals_on
from ci_core.scanning.seen import line_design


def evidence(costs, names=None):
    """Per-class evidence whose cost (the negated loss) is ``costs``."""
    names = names or [f"c{i}" for i in range(len(costs))]
    return [ClassEvidence(name=n, asr=0.5, loss=-float(c), statistic=None, ssim=1.0, seconds=0.0)
            for n, c in zip(names, costs)]


def test_the_fit_recovers_a_scaled_inverse_chi_square_prior():
    rng = np.random.default_rng(0)
    d, d0, s0 = 10, 20, 0.2
    true_variances = d0 * s0 / rng.chisquare(d0, 20_000)
    observed = true_variances * rng.chisquare(d, 20_000) / d
    prior = fit_variance_prior(observed, [d] * len(observed))
    assert prior.variance == pytest.approx(s0, rel=0.03) and prior.df == pytest.approx(d0, rel=0.15)
    assert prior.models == 20_000


def test_variances_that_scatter_no_more_than_chance_give_a_known_variance():
    rng = np.random.default_rng(1)
    observed = 0.5 * rng.chisquare(10, 5_000) / 10  # one true variance: only the chi-square's own scatter
    prior = fit_variance_prior(observed, [10] * len(observed))
    assert (prior.df is None or prior.df > 100) and prior.variance == pytest.approx(0.5, rel=0.02)
    # Variances that scatter less than chance would leave no room for a finite d0: a known variance, the mean of
    # log s^2 corrected for the chi-square's bias.
    prior = fit_variance_prior([0.5] * 6, [10] * 6)
    assert prior.df is None and prior.variance == pytest.approx(0.5 * math.exp(math.log(5) - special.digamma(5)))
    moderated, df = prior.moderate(np.array([0.1, 2.0]), 7)
    assert df == math.inf and moderated.tolist() == [prior.variance, prior.variance]


def test_the_fit_refuses_too_few_or_impossible_variances():
    with pytest.raises(ConfigError, match=f"at least {MIN_PRIOR_MODELS} clean models, got 3"):
        fit_variance_prior([0.1, 0.2, 0.3], [8, 8, 8])
    with pytest.raises(ConfigError, match="positive finite residual variances"):
        fit_variance_prior([0.1, 0.2, 0.0, 0.3, 0.4], [8] * 5)


def test_the_moderated_t_is_the_residual_over_the_pooled_leave_one_out_spread():
    rng = np.random.default_rng(2)
    x = rng.normal(size=12)
    y = 0.5 + 1.2 * x + rng.normal(scale=0.1, size=12)
    y[3] += 0.5
    design = line_design(x)
    prior = VariancePrior(variance=0.01, df=15.0, models=8)
    t = studentized_residuals_on(design, y, prior)
    n, p = design.shape
    for c in (0, 3, 7):  # by hand: leave class c out, refit, pool its residual variance with the prior's
        keep = np.arange(n) != c
        coef, *_ = np.linalg.lstsq(design[keep], y[keep], rcond=None)
        s2 = float(((y[keep] - design[keep] @ coef) ** 2).sum()) / (n - 1 - p)
        pooled = (15.0 * 0.01 + (n - p - 1) * s2) / (15.0 + n - p - 1)
        full, *_ = np.linalg.lstsq(design, y, rcond=None)
        h = (design @ np.linalg.pinv(design.T @ design) @ design.T)[c, c]
        assert t[c] == pytest.approx((y[c] - design[c] @ full) / math.sqrt(pooled * (1 - h)), rel=1e-9)
    variance, df = residual_variance(design, y)
    assert df == n - p and variance == pytest.approx(float(((y - design @ full) ** 2).sum()) / (n - p))


def simulated_scan(rng, x, spread, target=None, push=0.0, cluster=(), cluster_push=0.0):
    y = 0.1 + 0.9 * x + rng.normal(scale=spread, size=len(x))
    if target is not None:
        y[target] += push
    for c in cluster:
        y[c] += cluster_push
    return evidence(y)


def test_the_prior_finds_a_target_its_own_cluster_hides_and_holds_the_level_on_clean_models():
    """What the prior is for (docs/verdicts.md, "A tuned null for the residual spread"): a backdoor that moves a few
    classes besides its target swells the model's own residual spread, which hides the target from the test that
    estimates the spread from those classes; clean models' spread, known from others, does not.  And on clean
    models whose spread varies as the prior says, the moderated test keeps its family-wise level."""
    rng = np.random.default_rng(3)
    n, spread = 12, 0.03
    x = rng.normal(scale=0.1, size=n)
    reference = evidence(x)
    clean_fits = [ReferenceOutlierScorer().residual_variance(simulated_scan(rng, x, spread), reference)
                  for _ in range(30)]
    prior = fit_variance_prior([v for v, _ in clean_fits], [d for _, d in clean_fits])
    own, moderated = ReferenceOutlierScorer(), ReferenceOutlierScorer.from_options({"variance_prior": prior})
    found = {"own": 0, "prior": 0}
    for _ in range(40):
        model = simulated_scan(rng, x, spread, target=0, push=4 * spread, cluster=(1, 2, 3), cluster_push=2 * spread)
        found["own"] += own.score(model, reference).backdoored
        scores = moderated.score(model, reference)
        found["prior"] += scores.backdoored and scores.target == "c0"
    assert found["prior"] >= 20 and found["prior"] >= 2 * found["own"]
    assert "moderated by the prior of 30 clean tuned models" in moderated.score(model, reference).rule
    # The level: clean models whose variances scatter like the prior's (scaled inverse chi-square, d0 = 12).
    prior = VariancePrior(variance=spread ** 2, df=12.0, models=30)
    moderated = ReferenceOutlierScorer.from_options({"variance_prior": prior})
    flagged = 0
    for _ in range(2_000):
        own_spread = math.sqrt(12 * spread ** 2 / rng.chisquare(12))
        flagged += moderated.score(simulated_scan(rng, x, own_spread), reference).backdoored
    assert flagged / 2_000 <= 0.065  # alpha 0.05; Bonferroni over 12 classes is a little conservative


def test_the_scorer_takes_a_prior_for_one_least_squares_statistic_only():
    prior = {"variance": 0.01, "df": None, "models": 5}
    config = ReferenceOutlierScorer.from_options({"variance_prior": prior}).config
    assert config.variance_prior == VariancePrior(variance=0.01, df=None, models=5)
    with pytest.raises(ConfigError, match="variance_prior moderates the least-squares residuals of one statistic"):
        ReferenceOutlierScorer.from_options({"variance_prior": prior, "compare": "cost+margin"})
    with pytest.raises(ConfigError, match="variance_prior moderates"):
        ReferenceOutlierScorer.from_options({"variance_prior": prior, "fit": "robust", "seen_intercept": False})
    with pytest.raises(ConfigError, match="variance must be a positive finite number, got -1"):
        ReferenceOutlierScorer.from_options({"variance_prior": {"variance": -1, "df": 3, "models": 5}})
    with pytest.raises(ConfigError, match="variance_prior must be a variance prior"):
        ReferenceOutlierScorer.from_options({"variance_prior": "0.01"})


SPEC = {"kind": "reference", "backbone": {"name": "ci-tiny-clip"}, "template": "a photo of a {}.",
        "classnames": ["a", "b", "c", "d", "e"], "pool": {"inversion": 8, "holdout": 4, "sha256": "f" * 64},
        "seed": 0, "detector": "ci", "detector_config": {"epsilon": 0.03}}


def test_a_setting_ignores_the_pools_images_but_not_their_kind_number_or_the_statistic():
    statistic = ReferenceOutlierScorer().config.statistic()
    setting = prior_setting(SPEC, "own", statistic)
    other_images = prior_setting({**SPEC, "pool": {**SPEC["pool"], "sha256": "0" * 64}}, "own", statistic)
    assert spec_hash(setting) == spec_hash(other_images)
    for changed in (prior_setting(SPEC, "ood", statistic),
                    prior_setting({**SPEC, "pool": {**SPEC["pool"], "holdout": 5}}, "own", statistic),
                    prior_setting(SPEC, "own", {**statistic, "seen_intercept": False}),
                    prior_setting({**SPEC, "classnames": ["a", "b", "c", "d"]}, "own", statistic)):
        assert spec_hash(changed) != spec_hash(setting)
    with pytest.raises(ValueError, match="pool kind must be one of ood, id, own"):
        prior_setting(SPEC, "task", statistic)


def test_the_book_round_trips_and_names_what_it_lacks_and_what_is_wrong(tmp_path):
    statistic = ReferenceOutlierScorer().config.statistic()
    setting = prior_setting(SPEC, "ood", statistic)
    rows = [(f"clean-{i}", 0.01 * (1 + 0.1 * i), 9) for i in range(6)]
    book, left_out = build_book({spec_hash(setting): (setting, rows),
                                 "short": (prior_setting(SPEC, "own", statistic), rows[:4])})
    assert left_out == [(prior_setting(SPEC, "own", statistic), 4)] and len(book.entries) == 1
    path = tmp_path / "prior.json"
    book.write(path)
    read = PriorBook.read(path)
    assert read.lookup(setting) == book.lookup(setting) and read.entries[spec_hash(setting)][2] == tuple(k for k, _, _ in rows)
    with pytest.raises(ConfigError, match=r"holds no variance prior for this scan's setting \(5 classes .* own pool"):
        read.lookup(prior_setting(SPEC, "own", statistic))
    data = json.loads(path.read_text())
    for change, message in ((lambda d: d.update(kind="scan-report"), "not a variance prior book"),
                            (lambda d: d["priors"][0].update(models=3), "'models' is 3 but 'model_keys' lists 6"),
                            (lambda d: d["priors"][0].update(variance="big"), "'variance' must be a finite number"),
                            (lambda d: d["priors"][0].update(df=0), "df must be a positive finite number")):
        broken = json.loads(json.dumps(data))
        change(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=message):
            PriorBook.read(path)
    with pytest.raises(Exception, match="no scan setting has the scans of 5 or more clean models"):
        build_book({spec_hash(setting): (setting, rows[:4])})
