"""The attacks of issue 3: each trigger's own constraint, save/load, short runs, and `ci-bench attack`."""

import json

import pytest
import torch
from click.testing import CliRunner

from ci_attacks.badclip_adaptive import BadCLIPAdaptive, FrozenTrigger
from ci_attacks.blended import Blended, BlendTrigger
from ci_attacks.poisoning import poison
from ci_attacks.siba import SIBA, MaskedAdditiveTrigger, SIBAConfig, optimise_trigger, pixel_budget
from ci_attacks.wanet import WaNet, WarpTrigger, control_grid, identity_grid, warp_modes
from ci_core.cli.bench import main as bench
from ci_core.data.datasets import LabeledImages
from ci_core.errors import ConfigError
from ci_core.models.backbone import TINY_IMAGE_SIZE
from ci_core.models.bundle import load_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.plugins import registry
from ci_core.triggers import AdditiveTrigger
from ci_core.plugins import load_trigger
from ci_core.learning.protocol import choose_target, load_task

from test_plugins import install_fake_distribution

SIZE = TINY_IMAGE_SIZE
BUDGET = pixel_budget(SIBAConfig().l0_fraction, SIZE, SIZE)  # SIBA's l0 at the tiny world's size


def random_images(n=16, size=SIZE, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def warp(strength=1.0, k=4, seed=0):
    return WarpTrigger(control_grid(k, torch.Generator().manual_seed(seed)), strength)


def sparse(k=BUDGET, epsilon=8 / 255, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(SIZE * SIZE)
    mask[torch.randperm(SIZE * SIZE, generator=g)[:k]] = 1
    delta = (torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1) * epsilon
    return MaskedAdditiveTrigger(delta, mask.view(SIZE, SIZE))


def blend(alpha=0.2, seed=0):
    return BlendTrigger(torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)), alpha)


# --------------------------------------------------------------------------- trigger constraints


def test_blend_is_the_convex_mix_with_its_ratio():
    trigger, x = blend(0.2), random_images()
    stamped = trigger.apply(x)
    torch.testing.assert_close(stamped - x, 0.2 * (trigger.pattern - x))
    assert stamped.min() >= 0 and stamped.max() <= 1
    # The ratio is recoverable from any image: x' - x is alpha times (pattern - x).
    ratio = ((stamped - x) * (trigger.pattern - x)).sum() / ((trigger.pattern - x) ** 2).sum()
    assert ratio.item() == pytest.approx(0.2, abs=1e-5)


def test_masked_additive_trigger_respects_l0_and_linf():
    trigger, x = sparse(k=BUDGET), random_images()
    changed = (trigger.apply(x) - x).abs()
    assert changed.max() <= 8 / 255 + 1e-6
    per_pixel = changed.amax(dim=1) > 0  # (B, H, W): any channel changed
    assert per_pixel.sum(dim=(1, 2)).max() <= BUDGET
    assert not per_pixel[:, trigger.mask == 0].any()
    assert trigger.l0 == BUDGET and trigger.linf <= 8 / 255 + 1e-6


def test_pixel_budget_is_the_papers_1600_at_224_and_scales_with_area():
    fraction = SIBAConfig().l0_fraction
    assert pixel_budget(fraction, 224, 224) == 1600
    assert pixel_budget(fraction, 64, 64) == 131


def test_warp_moves_pixels_without_changing_colours():
    trigger = warp(1.0)
    flat = torch.full((2, 3, SIZE, SIZE), 0.3)
    torch.testing.assert_close(trigger.apply(flat), flat, atol=1e-4, rtol=0)  # a warp adds no colour
    assert trigger.grid(SIZE, SIZE).abs().max() <= 1
    x = random_images(2)
    torch.testing.assert_close(warp(0.0).apply(x), x, atol=1e-4, rtol=0)  # no strength, no warp (grid_sample rounding)
    assert (trigger.apply(x) - x).abs().max() > 0.05


def test_warp_displacement_is_bounded_and_smooth():
    k, strength = 4, 1.0
    trigger = warp(strength, k)
    # On a horizontal ramp, the warped value minus the original is the x displacement in pixels.
    ramp = torch.linspace(0, 1, SIZE).expand(1, 3, SIZE, SIZE).contiguous()
    shift = (trigger.apply(ramp) - ramp)[0, 0] * (SIZE - 1)
    field = trigger.displacement(SIZE, SIZE)
    torch.testing.assert_close(shift, field[..., 0], atol=1e-4, rtol=0)
    # Bound: s * max|upsampled control| / H grid units, i.e. about s * max|control| / 2 pixels
    # (bicubic upsampling may overshoot the control points a little).
    bound = strength * trigger.control.abs().max() * (SIZE - 1) / (2 * SIZE) * 1.25
    assert field.abs().max() <= bound
    assert field.abs().max() >= 0.3 * bound  # and it does move pixels
    # Smooth: the warp field (before the clamp to the image, which only pulls border pixels back)
    # varies on the scale of the control-point spacing, (H - 1) / (k - 1) pixels.
    flow = trigger.flow(SIZE, SIZE) * (SIZE - 1) / 2
    inside = (identity_grid(SIZE, SIZE) + trigger.flow(SIZE, SIZE)).abs().amax(dim=-1) < 1
    torch.testing.assert_close(field[inside], flow[inside])
    step = max((flow[1:] - flow[:-1]).abs().max(), (flow[:, 1:] - flow[:, :-1]).abs().max())
    assert step <= 2 * (flow.amax(dim=(0, 1)) - flow.amin(dim=(0, 1))).max() * (k - 1) / (SIZE - 1)


def test_control_grid_has_unit_mean_absolute_value():
    grid = control_grid(4, torch.Generator().manual_seed(3))
    assert grid.shape == (2, 4, 4)
    assert grid.abs().mean().item() == pytest.approx(1.0)


def test_identity_grid_returns_the_image():
    x = random_images(2)
    out = torch.nn.functional.grid_sample(x, identity_grid(SIZE, SIZE).expand(2, -1, -1, -1), align_corners=True)
    torch.testing.assert_close(out, x, atol=1e-4, rtol=0)  # grid_sample's own rounding reaches ~1e-5


def test_wanet_modes_follow_their_rates_and_labels():
    trigger = warp(1.0)
    n = 4000
    images, labels = torch.rand(n, 3, 8, 8), torch.randint(1, 5, (n,))
    g = torch.Generator().manual_seed(0)
    x, y = warp_modes(trigger, images, labels, 0, 0.1, 0.2, g)
    attack = y == 0
    assert attack.float().mean().item() == pytest.approx(0.1, abs=0.02)
    torch.testing.assert_close(x[attack], trigger.apply(images[attack]))
    untouched = (x == images).flatten(1).all(dim=1)
    assert untouched.float().mean().item() == pytest.approx(0.7, abs=0.03)
    noise = ~attack & ~untouched
    assert noise.float().mean().item() == pytest.approx(0.2, abs=0.03)
    assert torch.equal(y[~attack], labels[~attack])  # clean and noise keep the true label
    assert not torch.allclose(x[noise], trigger.apply(images[noise]))  # noise is not the exact warp


def test_adaptive_perturbations_have_the_papers_spread_and_stay_in_the_box():
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    eps = 4 / 255
    centre = torch.zeros(3, 4, 4)
    small = FrozenTrigger(centre, std, eps, alpha=0.1, generator=torch.Generator().manual_seed(0))
    draws = small.perturbed(2000)
    spread = draws.transpose(0, 1).flatten(1).std(dim=1)
    torch.testing.assert_close(spread, 0.1 * eps / std, rtol=0.03, atol=0)
    corner = FrozenTrigger(eps / std.view(3, 1, 1).expand(3, 4, 4), std, eps, alpha=0.5,
                           generator=torch.Generator().manual_seed(0))
    draws = corner.perturbed(500)
    assert (draws.abs() <= eps / std.view(1, 3, 1, 1) + 1e-7).all()
    assert (draws < corner.delta).float().mean() > 0.3  # perturbed copies do differ from the exact trigger


def test_poisoning_relabels_the_given_share_of_non_target_images():
    images, labels = random_images(40, size=8), torch.arange(40) % 4
    data = LabeledImages(images, labels, ("a", "b", "c", "d"))
    trigger = BlendTrigger(torch.ones(3, 8, 8), 0.2)
    poisoned, chosen = poison(data, trigger, 2, 0.1, torch.Generator().manual_seed(0))
    assert len(chosen) == 4 and (labels[chosen] != 2).all()
    assert (poisoned.labels[chosen] == 2).all()
    torch.testing.assert_close(poisoned.images[chosen], trigger.apply(images[chosen]))
    rest = torch.ones(40, dtype=torch.bool)
    rest[chosen] = False
    assert torch.equal(poisoned.images[rest], images[rest]) and torch.equal(poisoned.labels[rest], labels[rest])


@pytest.mark.parametrize("make", [blend, warp, sparse, lambda: AdditiveTrigger(torch.rand(3, SIZE, SIZE) * 0.01)],
                         ids=["blend", "warp", "masked-additive", "additive"])
def test_trigger_save_load_round_trip(tmp_path, make):
    trigger = make()
    trigger.save(tmp_path / "t.safetensors")
    loaded = load_trigger(tmp_path / "t.safetensors")
    assert type(loaded) is type(trigger) and loaded.kind == trigger.kind
    x = random_images(3)
    torch.testing.assert_close(loaded.apply(x), trigger.apply(x))
    assert json.loads((tmp_path / "t.safetensors.json").read_text())["kind"] == trigger.kind


# --------------------------------------------------------------------------- short runs


@pytest.fixture(scope="module")
def small_task(random_backbone):
    task = load_task(registry().get("dataset", "tiny-colorshapes")(), random_backbone, seed=1, shots=2)
    return task, choose_target(task, 1)


def test_siba_trigger_optimisation_keeps_its_budget(random_backbone, small_task):
    task, target = small_task
    torch.manual_seed(0)
    surrogate = PromptTunedCLIP(random_backbone)
    config = SIBAConfig(trigger_epochs=3, mask_every=2, trigger_batch_size=8)
    index = task.train.classnames.index(target)
    trigger, losses = optimise_trigger(surrogate, task.train.images[:16], task.train.classnames, index, config,
                                       torch.Generator().manual_seed(0))
    assert len(losses) == 3 and trigger.l0 == BUDGET
    assert 0 < trigger.linf <= 8 / 255 + 1e-6
    assert torch.equal(trigger.delta != 0, (trigger.mask != 0).expand(3, -1, -1) & (trigger.delta != 0))


SHORT = {
    "badclip-adaptive": (BadCLIPAdaptive, {"epochs": 1, "warmup_epochs": 1, "phase2_epochs": 1}, AdditiveTrigger),
    "blended": (Blended, {"epochs": 1}, BlendTrigger),
    "wanet": (WaNet, {"epochs": 1}, WarpTrigger),
    "siba": (SIBA, {"epochs": 1, "trigger_epochs": 2}, MaskedAdditiveTrigger),
}


@pytest.mark.parametrize("name", list(SHORT))
def test_short_run_returns_model_and_trigger(random_backbone, small_task, name):
    cls, options, trigger_type = SHORT[name]
    assert registry().get("attack", name) is cls
    task, target = small_task
    outcome = cls.from_options(options, preset="tiny").run(backbone=random_backbone, train=task.train, target=target,
                                                           seed=1)
    assert type(outcome.trigger) is trigger_type
    assert len(outcome.log["loss"]) == 1 and all(torch.isfinite(torch.tensor(outcome.log["loss"])))
    stamped = outcome.trigger.apply(task.train.images[:4])
    assert stamped.shape == (4, 3, SIZE, SIZE) and 0 <= stamped.min() and stamped.max() <= 1
    with torch.no_grad():
        assert outcome.model(stamped, task.train.classnames).shape == (4, len(task.train.classnames))


def test_attacks_need_a_target(random_backbone, small_task):
    task, _ = small_task
    with pytest.raises(ConfigError, match="blended needs a target class"):
        Blended.from_options({"epochs": 1}).run(backbone=random_backbone, train=task.train, target=None, seed=1)


# --------------------------------------------------------------------------- ci-bench attack

THIRD_PARTY = '''
from ci_attacks.blended import Blended
from ci_core import hookimpl


class ThirdPartyBlend(Blended):
    name = "third-party-blend"
    description = "a Blended variant from another distribution"


@hookimpl
def register_attacks(register):
    register(ThirdPartyBlend)
'''


@pytest.fixture()
def third_party(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(site, "third_party_attack", THIRD_PARTY)
    monkeypatch.syspath_prepend(str(site))
    registry.cache_clear()
    yield
    registry.cache_clear()


def test_third_party_attack_is_listed_and_runs_in_ci_bench_attack(tmp_path, third_party):
    listed = CliRunner().invoke(bench, ["plugins"])
    assert listed.exit_code == 0, listed.output
    assert any(line.split()[:2] == ["attack", "third-party-blend"] and "third-party-attack 0.1" in line
               for line in listed.output.splitlines())
    out = tmp_path / "run"
    result = CliRunner().invoke(bench, ["attack", "third-party-blend", "--dataset", "tiny-palette",
                                        "--target", "green dots", "--seed", "2", "--shots", "2",
                                        "--option", "epochs=1", "--option", "alpha=0.3", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [".clip-inspector-output.json", "bundle", "metrics.json",
                                                     "trigger.safetensors", "trigger.safetensors.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attack"] == "third-party-blend" and metrics["target"] == "green dots" and metrics["seed"] == 2
    assert metrics["config"]["alpha"] == 0.3 and metrics["config"]["epochs"] == 1 and metrics["preset"] == "tiny"
    for key in ("acc_base", "acc_new", "asr_base", "asr_new", "trigger_ssim"):
        assert 0 <= metrics[key] <= 1
    assert metrics["seconds"] > 0 and metrics["trigger"] == "blend"
    trigger = load_trigger(out / "trigger.safetensors")
    assert isinstance(trigger, BlendTrigger) and trigger.alpha == 0.3
    model, meta = load_bundle(out / "bundle")
    assert meta["base_classes"][:4] == ["red stripes", "red dots", "red checks", "green stripes"]
    assert len(meta["classnames"]) == 24 and model.n_ctx == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no temporary folder left behind


@pytest.mark.parametrize("args, message", [
    (["nope", "--dataset", "tiny-colorshapes"], "unknown attack 'nope'. Available attacks: clean, badclip"),
    (["blended", "--dataset", "no-such-data"], "unknown dataset 'no-such-data'"),
    (["blended", "--dataset", "tiny-colorshapes", "--option", "alpha=2"], "blended options"),
    (["blended", "--dataset", "tiny-colorshapes", "--option", "nonsense=1"], "unknown option(s) ['nonsense']"),
    (["blended", "--dataset", "tiny-colorshapes", "--option", "alpha"], "expected KEY=VALUE"),
    (["blended", "--dataset", "tiny-colorshapes", "--target", "cyan star"], "is not a base class of tiny-colorshapes"),
    (["clean", "--dataset", "tiny-colorshapes", "--target", "red circle"], "drop --target"),
])
def test_ci_bench_attack_rejects_bad_input(tmp_path, args, message):
    result = CliRunner().invoke(bench, ["attack", *args, "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [("--shots", "0"), ("--seed", "-1"), ("--seed", "1e23")])
def test_ci_bench_attack_checks_counts_by_option_name(tmp_path, option, value):
    result = CliRunner().invoke(bench, ["attack", "blended", "--dataset", "tiny-colorshapes", option, value,
                                        "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and f"'{option}'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_ci_bench_attack_will_not_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(bench, ["attack", "blended", "--dataset", "tiny-colorshapes", "--out",
                                        str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "is not a folder this toolkit wrote" in result.output
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
