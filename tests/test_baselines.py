"""The baseline detectors as separate distributions (Neural Cleanse ``nc``, Pixel Backdoor ``pixb``) and the ``mad`` scorer.

Both distributions look installed from ``plugins/`` for this module, as ``pip install ./plugins/...``
would install them: ``ci_core.testing.source_distribution`` serves their pyproject metadata (name,
version, ``clip_inspector`` entry points) through ``importlib.metadata.distributions`` and imports their
code from the folder.  Nothing is installed into the environment.
"""

import contextlib
import importlib
import importlib.metadata
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ci_core.cli.bench import main as ci_bench
from ci_core.cli.scan import main as ci_scan
from ci_core.testing import hidden_distribution, source_distribution
from ci_core.errors import ConfigError, DataError, PluginError
from ci_core.interfaces import ClassEvidence
from ci_core.learning.evaluation import predict
from ci_core.models.bundle import save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.plugins import Registry, plugin_manager, registry
from ci_core.triggers import AdditiveTrigger
from ci_core.plugins import load_trigger
from ci_core.models.backbone import TINY_IMAGE_SIZE
from ci_detectors.mad import MADScorer

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = ("ci-detectors-nc", "ci-detectors-pixb")
CLASSES = ("red circle", "blue square", "green star", "yellow cross")
TARGET = 2


# --------------------------------------------------------------------------- the distributions, as if installed


@pytest.fixture(scope="module", autouse=True)
def baselines():
    with contextlib.ExitStack() as installed:
        for dist in DISTRIBUTIONS:
            installed.enter_context(source_distribution(ROOT / "plugins" / dist))
        yield


@pytest.fixture(scope="module")
def nc():
    return importlib.import_module("ci_detectors_nc")


@pytest.fixture(scope="module")
def pixb():
    return importlib.import_module("ci_detectors_pixb")


# --------------------------------------------------------------------------- a model with an obvious backdoor


class PlantedBackdoor(PromptTunedCLIP):
    """CoCoOp on the random-weight tiny CLIP with a hard-wired backdoor.

    The target's logit gets ``boost * sigmoid(20 (b - 0.75)) - penalty``, b the mean
    brightness of the top-left ``patch`` x ``patch`` pixels: clean images (b about
    0.5) never land on the target; brightening the patch sends any image there.
    """

    def __init__(self, backbone, target: int, patch: int = 8, boost: float = 40.0, penalty: float = 10.0):
        super().__init__(backbone)
        self.target, self.patch, self.boost, self.penalty = target, patch, boost, penalty

    def forward(self, images, classnames):
        logits = super().forward(images, classnames)
        brightness = images[:, :, :self.patch, :self.patch].mean(dim=(1, 2, 3))
        bonus = torch.zeros_like(logits)
        bonus[:, self.target] = self.boost * torch.sigmoid(20 * (brightness - 0.75)) - self.penalty
        return logits + bonus


@pytest.fixture(scope="module")
def planted(random_backbone):
    torch.manual_seed(0)
    model = PlantedBackdoor(random_backbone, TARGET).eval()
    model.prompt_learner.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(48, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g), torch.rand(32, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)  # D, T


def invert_planted(detector, planted, images):
    """``detector``'s inversion towards the planted target on D, and the ASR of its trigger on T."""
    inversion_set, holdout = images
    inversion = detector.invert(model=planted, images=inversion_set, classnames=CLASSES, target=TARGET,
                                generator=torch.Generator().manual_seed(0))
    asr = float(predict(planted, inversion.trigger.apply(holdout), CLASSES).eq(TARGET).float().mean())
    return inversion, asr


def test_planted_model_needs_its_trigger(planted, images):
    _, holdout = images
    assert predict(planted, holdout, CLASSES).eq(TARGET).sum() == 0
    bright = holdout.clone()
    bright[:, :, :8, :8] = 1.0
    assert predict(planted, bright, CLASSES).eq(TARGET).all()


# --------------------------------------------------------------------------- discovery


CORE = f"clip-inspector {importlib.metadata.version('clip-inspector')}"  # the installed core, whatever its release


def test_distributions_are_discovered():
    reg = Registry(plugin_manager())
    entries = {e.name: e for e in reg.entries() if e.kind == "detector"}
    assert entries["nc"].distribution == "ci-detectors-nc 0.2.0"
    assert entries["pixb"].distribution == "ci-detectors-pixb 0.2.0"
    assert entries["nc"].cls.__module__ == "ci_detectors_nc.detector"
    assert entries["pixb"].cls.__module__ == "ci_detectors_pixb.detector"
    assert reg.get("detector", "nc").default_scorer == "mad" and reg.get("detector", "pixb").default_scorer == "mad"
    assert [e.distribution for e in reg.entries() if e.kind == "scorer" and e.name == "mad"] == [CORE]


def test_plugins_command_lists_the_baselines():
    result = CliRunner().invoke(ci_bench, ["plugins"])
    assert result.exit_code == 0, result.output
    rows = {tuple(line.split()[:2]): line for line in result.output.splitlines()}
    assert "ci-detectors-nc 0.2.0" in rows[("detector", "nc")]
    assert "ci-detectors-pixb 0.2.0" in rows[("detector", "pixb")]
    assert CORE in rows[("scorer", "mad")]


def test_bad_options_are_named(nc, pixb):
    for cls in (nc.NeuralCleanse, pixb.PixelBackdoor):
        with pytest.raises(ConfigError, match="patience"):
            cls.from_options({"patience": 0})
        with pytest.raises(ConfigError, match="epochs"):
            cls.from_options({"epochs": 2.5})
        with pytest.raises(ConfigError, match="unknown option"):
            cls.from_options({"cost": 1})
        assert cls.from_options(preset="tiny").config.batch_size == 4
    with pytest.raises(ConfigError, match="asr_threshold"):
        nc.NeuralCleanse.from_options({"asr_threshold": 1.5})
    with pytest.raises(ConfigError, match="cost_multiplier"):
        pixb.PixelBackdoor.from_options({"cost_multiplier": 1.0})


# --------------------------------------------------------------------------- the mad scorer


def evidence(stats, names=None):
    names = names or [f"c{i}" for i in range(len(stats))]
    return [ClassEvidence(name=n, asr=0.5, loss=1.0, statistic=s, ssim=1.0, seconds=0.0,
                          trigger=AdditiveTrigger(torch.zeros(3, 2, 2))) for n, s in zip(names, stats)]


def test_mad_scorer_hand_computed():
    # median 11; |x - 11| = 1, 1, 0, 9, 2 -> median 1 -> MAD = 1.4826
    scores = MADScorer.from_options().score(evidence([10, 12, 11, 2, 13], list("abcde")))
    assert np.allclose(scores.scores, [1 / 1.4826, -1 / 1.4826, 0.0, 9 / 1.4826, -2 / 1.4826])
    assert scores.target == "d" and scores.s_max == pytest.approx(6.0704, abs=1e-4)
    assert scores.backdoored and scores.flagged == ("d",)
    strict = MADScorer.from_options({"k": 7}).score(evidence([10, 12, 11, 2, 13], list("abcde")))
    assert not strict.backdoored and strict.flagged == () and strict.target == "d"


def test_mad_scorer_flags_only_below_the_median():
    # median 12, |x - 12| = 2, 0, 1, 88, 1 -> MAD 1.4826; the huge statistic is far out, but above the median
    scores = MADScorer.from_options().score(evidence([10, 12, 11, 100, 13], list("abcde")))
    assert scores.scores[3] == pytest.approx(-88 / 1.4826) and scores.scores[0] == pytest.approx(2 / 1.4826)
    assert not scores.backdoored and scores.flagged == () and scores.target == "a"


def test_mad_scorer_zero_mad_falls_back_to_mean_deviation():
    # median 5, MAD 0; mean |x - 5| = 1 -> scale 1.2533: the small class stands out by 4 / 1.2533 = 3.19
    scores = MADScorer.from_options().score(evidence([5, 5, 5, 1]))
    assert scores.scores == pytest.approx((0, 0, 0, 4 / math.sqrt(math.pi / 2)))
    assert scores.flagged == ("c3",) and scores.backdoored
    same = MADScorer.from_options().score(evidence([7, 7, 7]))
    assert same.scores == (0.0, 0.0, 0.0) and not same.backdoored


def test_mad_scorer_needs_a_statistic():
    with pytest.raises(ConfigError, match="statistic"):
        MADScorer.from_options().score(evidence([3.0, None, 2.0]))
    with pytest.raises(ConfigError, match="non-finite"):
        MADScorer.from_options().score(evidence([3.0, float("nan"), 2.0]))
    with pytest.raises(ConfigError, match="k"):
        MADScorer.from_options({"k": -1})


# --------------------------------------------------------------------------- Neural Cleanse: schedule, trigger, run


def run_schedule(schedule, asrs, regs=None):
    regs = regs if regs is not None else [100.0] * len(asrs)
    costs, stops = [], []
    for asr, reg in zip(asrs, regs):
        outcome = schedule.update(asr, reg)
        costs.append(schedule.cost)
        stops.append(outcome.stop)
    return costs, stops


def test_nc_cost_starts_at_zero_and_is_set_after_patience(nc):
    schedule = nc.CostSchedule(init_cost=1e-3, threshold=0.99, patience=5, multiplier=2.0)
    # a miss resets the count: the cost is set on the 5th success in a row, step 9
    costs, _ = run_schedule(schedule, [1, 1, 1, 0.5, 0.99, 1, 1, 1, 1])
    assert costs == [0] * 8 + [1e-3]
    assert not schedule.raised and not schedule.lowered


def test_nc_cost_moves_up_and_down(nc):
    # (with the default early stop, this constant mask norm would end the run at step 26)
    schedule = nc.CostSchedule(init_cost=1e-3, threshold=0.99, patience=5, multiplier=2.0, early_stop=False)
    asrs = [1.0] * 18 + [0.98] * 5 + [1.0] * 4 + [0.5] + [0.5] * 4
    costs, stops = run_schedule(schedule, asrs)
    # set at step 5 (which also counts as the first success at that cost), doubled at steps 9 and 14,
    # divided by 2 ** 1.5 after five misses (step 23); four successes and a miss move nothing;
    # five misses in a row divide again (step 32)
    expected = [0.0] * 4 + [1e-3] * 4 + [2e-3] * 5 + [4e-3] * 5
    assert costs[:18] == pytest.approx(expected)
    assert costs[18:22] == pytest.approx([4e-3] * 4) and costs[22] == pytest.approx(4e-3 / 2 ** 1.5)
    assert costs[23:31] == pytest.approx([4e-3 / 2 ** 1.5] * 8)
    assert costs[31] == pytest.approx(4e-3 / 2 ** 3)
    assert schedule.raised and schedule.lowered and not any(stops)


def test_nc_early_stop_after_both_moves_and_no_improvement(nc):
    def sequence():
        schedule = nc.CostSchedule(init_cost=1e-3, threshold=0.99, patience=5, multiplier=2.0, early_stop_patience=25)
        asrs = [1.0] * 10 + [0.5] * 5 + [1.0] * 60
        return schedule, asrs

    schedule, asrs = sequence()
    # the best norm (100) is set at step 1 and never improves; the cost rises at step 9 and falls
    # at step 15; 25 steps without improvement are reached at step 26
    costs, stops = run_schedule(schedule, asrs)
    assert stops.index(True) == 25
    assert schedule.raised and schedule.lowered

    schedule, asrs = sequence()
    regs = [100.0] * 19 + [50.0] + [60.0] * 55  # an improvement at step 20 restarts the count
    outcomes = [schedule.update(a, r) for a, r in zip(asrs, regs)]
    assert [o.new_best for o in outcomes].count(True) == 2 and outcomes[19].new_best
    assert [o.stop for o in outcomes].index(True) == 19 + 25

    schedule = nc.CostSchedule(early_stop=False)
    assert not any(run_schedule(schedule, [1.0] * 10 + [0.5] * 5 + [1.0] * 60)[1])


def test_nc_no_early_stop_before_the_cost_has_moved_both_ways(nc):
    schedule = nc.CostSchedule(init_cost=1e-3, threshold=0.99, patience=5, multiplier=2.0, early_stop_patience=25)
    _, stops = run_schedule(schedule, [1.0] * 100)  # only ever raised
    assert not any(stops) and schedule.raised and not schedule.lowered


def test_mask_pattern_trigger(nc, tmp_path):
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1.0
    mask[0, 1, 1] = 0.25
    pattern = torch.full((3, 2, 2), 0.8)
    trigger = nc.MaskPatternTrigger(mask, pattern)
    images = torch.full((1, 3, 2, 2), 0.4)
    out = trigger.apply(images)
    assert torch.allclose(out[0, :, 0, 0], torch.full((3,), 0.8))
    assert torch.allclose(out[0, :, 1, 1], torch.full((3,), 0.75 * 0.4 + 0.25 * 0.8))
    assert torch.allclose(out[0, :, 0, 1], torch.full((3,), 0.4))
    assert trigger.l1 == pytest.approx(1.25)
    trigger.save(tmp_path / "t.safetensors")
    assert json.loads((tmp_path / "t.safetensors.json").read_text())["kind"] == "mask-pattern"
    loaded = load_trigger(tmp_path / "t.safetensors")
    assert isinstance(loaded, nc.MaskPatternTrigger) and torch.equal(loaded.mask, mask)
    with pytest.raises(ValueError, match=r"mask must have shape \(1, H, W\)"):
        nc.MaskPatternTrigger(torch.zeros(3, 2, 2), pattern)
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        nc.MaskPatternTrigger(mask + 1, pattern)
    with pytest.raises(DataError, match="missing"):
        nc.MaskPatternTrigger.from_saved({"mask": mask}, {})
    with pytest.raises(DataError, match="different image sizes"):
        nc.MaskPatternTrigger.from_saved({"mask": mask, "pattern": torch.zeros(3, 4, 4)}, {})


def test_nc_tanh_parametrisation_stays_in_range(nc):
    from ci_detectors_nc.detector import from_tanh, to_tanh

    v = torch.tensor([-1e4, -20.0, -1.0, 0.0, 1.0, 20.0, 1e4])
    u = from_tanh(v)
    assert float(u.min()) >= 0 and float(u.max()) <= 1 and u[3] == pytest.approx(0.5)
    assert torch.allclose(from_tanh(to_tanh(torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))),
                          torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]), atol=1e-6)


def test_nc_finds_the_planted_backdoor(nc, planted, images):
    inversion, asr = invert_planted(nc.NeuralCleanse.from_options({"epochs": 10, "batch_size": 16}), planted, images)
    trigger = inversion.trigger
    assert isinstance(trigger, nc.MaskPatternTrigger)
    assert asr >= 0.9
    mask = trigger.mask[0]
    assert float(mask.min()) >= 0 and float(mask.max()) <= 1
    assert float(trigger.pattern.min()) >= 0 and float(trigger.pattern.max()) <= 1
    # the mask sits on the planted patch, and is small elsewhere
    inside = float(mask[:8, :8].mean())
    outside = float((mask.sum() - mask[:8, :8].sum()) / (mask.numel() - 64))
    # (measured on the 96 px tiny CLIP: inside 0.71, outside 0.21 of a 96 x 96 mask)
    assert inside > 0.5 and inside > 3 * outside
    assert inversion.statistic == pytest.approx(float(mask.sum()))
    assert len(inversion.loss_trace) == 30 and inversion.loss == pytest.approx(np.mean(inversion.loss_trace))


def test_nc_mask_stays_in_range_when_it_saturates(nc, planted, images):
    inversion_set, _ = images
    detector = nc.NeuralCleanse.from_options({"epochs": 1, "batch_size": 16, "lr": 50.0})
    trigger = detector.invert(model=planted, images=inversion_set, classnames=CLASSES, target=TARGET,
                              generator=torch.Generator().manual_seed(0)).trigger
    for t in (trigger.mask, trigger.pattern):
        assert float(t.min()) == 0.0 and float(t.max()) == 1.0  # saturated, and still inside [0, 1]


# --------------------------------------------------------------------------- Pixel Backdoor: counting, schedule, run


def test_pixb_pixel_count_on_hand_made_patterns(pixb):
    pos = torch.zeros(3, 4, 4)
    neg = torch.zeros(3, 4, 4)
    pos[0, 0, 0] = 0.5
    neg[1, 0, 0] = 0.2  # same pixel, another channel: still one pixel
    neg[2, 1, 2] = 0.7
    pos[2, 3, 3] = 0.003  # under 1/255: pruned away
    pos[0, 2, 2] = neg[0, 2, 2] = 0.3  # cancels in the pattern: not a perturbed pixel
    pos[1, 3, 0] = 1 / 255  # exactly one grey level: kept
    kept_pos, kept_neg = pixb.prune(pos), pixb.prune(neg)
    assert kept_pos[2, 3, 3] == 0 and kept_pos[1, 3, 0] == pytest.approx(1 / 255)
    assert pixb.count_pixels(kept_pos - kept_neg) == 3
    assert pixb.count_pixels(pos - neg) == 4
    assert pixb.count_pixels(torch.zeros(3, 4, 4)) == 0
    with pytest.raises(ValueError):
        pixb.count_pixels(torch.zeros(4, 4))


def test_pixb_l0_surrogate(pixb):
    assert float(pixb.l0_surrogate(torch.zeros(3, 2, 2))) == pytest.approx(4 * 0.5)
    v = torch.full((3, 2, 2), -1e3)
    assert float(pixb.l0_surrogate(v)) == pytest.approx(0.0, abs=1e-6)
    v[1, 0, 1] = 1e3  # one channel of one pixel fully on: that pixel counts once
    assert float(pixb.l0_surrogate(v)) == pytest.approx(1.0, abs=1e-6)
    v = torch.zeros(3, 2, 2, requires_grad=True)
    pixb.l0_surrogate(v).backward()
    assert float(v.grad.abs().sum()) > 0


def test_pixb_cost_balancer(pixb):
    balancer = pixb.CostBalancer(init_cost=1e-3, bound=0.9, patience=10, multiplier=1.5)
    costs = [balancer.update(a) for a in [0.9] * 10]
    assert costs == pytest.approx([1e-3] * 9 + [1.5e-3])
    costs = [balancer.update(a) for a in [0.5] * 9 + [0.95] + [0.5] * 10]
    assert costs == pytest.approx([1.5e-3] * 19 + [1.5e-3 / 1.5 ** 1.5])


def test_pixb_finds_the_planted_backdoor(pixb, planted, images):
    inversion, asr = invert_planted(pixb.PixelBackdoor.from_options({"epochs": 4, "batch_size": 16}), planted, images)
    trigger = inversion.trigger
    assert isinstance(trigger, AdditiveTrigger)
    assert asr >= 0.9
    pattern = trigger.delta
    assert float(pattern.min()) >= -1 and float(pattern.max()) <= 1
    assert float(pattern[:, :8, :8].mean()) > 0.2  # it brightens the planted patch
    assert inversion.statistic == pixb.count_pixels(pattern)
    assert len(inversion.loss_trace) == 12


# --------------------------------------------------------------------------- ci-scan with and without the distributions


@pytest.fixture()
def bundle(tmp_path, random_backbone):
    torch.manual_seed(0)
    return save_bundle(PromptTunedCLIP(random_backbone), CLASSES, tmp_path / "bundle")


@pytest.mark.parametrize("detector", ["nc", "pixb"])
def test_ci_scan_runs_a_baseline(detector, tmp_path, bundle):
    out = tmp_path / "scan"
    result = CliRunner().invoke(ci_scan, [str(bundle), "--ood", "builtin", "--detector", detector, "--out", str(out),
                                          "--pool-size", "8", "--holdout", "4", "--option", "epochs=1",
                                          "--option", "batch_size=4", "--quiet"])
    assert result.exit_code in (0, 3), result.output  # a verdict either way
    report = json.loads((out / "report.json").read_text())
    # The calibrated scorer decides against the reference scan of the same detector; NC's own rule is beside it.
    assert report["detector"] == detector and report["scorer"] == "ref-outlier" and set(report["scorers"]) == {
        "ref-outlier", "mad"}
    assert report["scorers"]["mad"]["config"] == {"k": 2.0} and report["reference"]["model"] == "zero-shot backbone"
    assert all(isinstance(row["reference_statistic"], float) for row in report["classes"])
    assert report["detector_config"]["epochs"] == 1
    assert [row["name"] for row in report["classes"]] == list(CLASSES)
    assert all(isinstance(row["statistic"], float) and 0 <= row["asr"] <= 1 for row in report["classes"])
    assert report["s_max"] == max(row["score"] for row in report["classes"])
    assert report["scorers"]["mad"]["s_max"] == max(row["scores"]["mad"] for row in report["classes"])
    saved = load_trigger(out / "triggers" / "000_red_circle.safetensors")
    assert type(saved).kind == ("mask-pattern" if detector == "nc" else "additive")


def test_uninstalled_nc_is_refused_with_the_distribution_to_install(tmp_path, bundle):
    with hidden_distribution("ci-detectors-nc"):  # as if pip-uninstalled
        assert "nc" not in Registry(plugin_manager()).names("detector")
        result = CliRunner().invoke(ci_scan, [str(bundle), "--ood", "builtin", "--detector", "nc",
                                              "--out", str(tmp_path / "scan"), "--quiet"])
        assert result.exit_code == 1
        assert "unknown detector 'nc'" in result.output and "pip install ci-detectors-nc" in result.output
        assert not (tmp_path / "scan").exists()
        with pytest.raises(PluginError, match="ci-detectors-nc"):
            registry().get("detector", "nc")
    assert "nc" in Registry(plugin_manager()).names("detector")
