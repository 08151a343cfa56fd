"""The encoder-level Blended attack (issue 3, item 5): its triggers, the zero-shot bundle, a short run, ci-scan."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ci_attacks.encoder_blended import PATTERNS, EncoderBlended, PatternBlendTrigger, make_trigger
from ci_core.cli.bench import main as bench
from ci_core.cli.repair import main as ci_repair
from ci_core.cli.scan import main as ci_scan
from ci_core.errors import BundleError, ConfigError
from ci_core.learning.evaluation import attack_success_rate
from ci_core.models.weights import state_dict_sha256
from ci_core.models.bundle import load_bundle, save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.zeroshot import ZeroShotCLIP
from ci_core.plugins import registry
from ci_core.plugins import load_trigger
from ci_core.learning.protocol import choose_target, load_task

from test_ood import write_images

CLASSES = ("red circle", "blue square", "green star", "pink ring")


def trigger(pattern, pixels=64, alpha=0.2, seed=0, **options):
    options = {"size": 0.25, "text": "hello", **options}
    return make_trigger(pattern, pixels, pixels, alpha=alpha, generator=torch.Generator().manual_seed(seed), **options)


def random_images(n=8, size=64, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- triggers


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("size", [64, 128])
def test_pattern_is_blended_at_its_ratio_inside_the_mask_only(pattern, size):
    t, x = trigger(pattern, pixels=size, alpha=0.2), random_images(size=size)
    stamped = t.apply(x)
    inside = t.mask.bool()
    assert 0 < inside.sum() < size * size
    torch.testing.assert_close(stamped[..., inside], (0.8 * x + 0.2 * t.pattern.unsqueeze(0))[..., inside])
    assert torch.equal(stamped[..., ~inside], x[..., ~inside])
    assert stamped.min() >= 0 and stamped.max() <= 1
    # The ratio is recoverable from the images alone, as for a blend over the whole image.
    change, reach = (stamped - x)[..., inside], (t.pattern.unsqueeze(0) - x)[..., inside]
    assert ((change * reach).sum() / (reach**2).sum()).item() == pytest.approx(0.2, abs=1e-5)


def test_the_three_patterns_differ():
    triggers = {p: trigger(p) for p in PATTERNS}
    x = random_images()
    for a in PATTERNS:
        for b in PATTERNS:
            if a < b:
                masks = triggers[a].mask.bool(), triggers[b].mask.bool()
                union = (masks[0] | masks[1]).sum()
                assert (masks[0] & masks[1]).sum() < 0.7 * union, (a, b)
                assert (triggers[a].apply(x) - triggers[b].apply(x)).abs().max() > 0.05, (a, b)
    # The noise patch is noisy, the triangle and the text are flat white shapes.
    noise = triggers["noise"]
    assert noise.pattern[:, noise.mask.bool()].std() > 0.1
    for flat in ("triangle", "text"):
        assert torch.equal(triggers[flat].pattern[:, triggers[flat].mask.bool()].unique(), torch.tensor([1.0]))


def test_patterns_follow_seed_text_and_size():
    assert torch.equal(trigger("noise", seed=3).pattern, trigger("noise", seed=3).pattern)
    assert not torch.equal(trigger("noise", seed=3).pattern, trigger("noise", seed=4).pattern)
    assert not torch.equal(trigger("text", text="hello").mask, trigger("text", text="world").mask)
    assert trigger("triangle", pixels=128).mask.sum() > 3 * trigger("triangle", pixels=64).mask.sum()
    assert trigger("noise", size=0.5).mask.sum() == 32 * 32
    # Every pattern sits in the bottom-right corner.
    for p in PATTERNS:
        rows, cols = torch.nonzero(trigger(p).mask, as_tuple=True)
        assert rows.max() == 63 and cols.max() == 63 and rows.min() >= 32 and cols.min() >= 32


def test_pattern_trigger_round_trips_and_checks_its_input(tmp_path):
    t = trigger("text", alpha=0.3)
    t.save(tmp_path / "t.safetensors")
    loaded = load_trigger(tmp_path / "t.safetensors")
    assert isinstance(loaded, PatternBlendTrigger) and loaded.alpha == 0.3 and loaded.name == "text"
    torch.testing.assert_close(loaded.apply(random_images(3)), t.apply(random_images(3)))
    with pytest.raises(ValueError, match="mask must be binary"):
        PatternBlendTrigger(torch.rand(3, 8, 8), torch.full((8, 8), 0.5), 0.2)
    with pytest.raises(ValueError, match="alpha must lie in"):
        PatternBlendTrigger(torch.rand(3, 8, 8), torch.ones(8, 8), 1.5)
    with pytest.raises(ValueError, match=r"the blend pattern is \(64, 64\) but the images are \(32, 32\)"):
        t.apply(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("options, message", [
    ({"pattern": "square"}, "pattern must be one of noise, triangle, text, got 'square'"),
    ({"alpha": 0}, "alpha"),
    ({"text": "  "}, "text must be non-empty printable text"),
    ({"nonsense": 1}, "unknown option(s) ['nonsense']"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match="encoder-blended options") as info:
        EncoderBlended.from_options(options)
    assert message in str(info.value)


# --------------------------------------------------------------------------- the zero-shot model and its bundle


@pytest.fixture()
def zero_shot(random_backbone):
    model = ZeroShotCLIP(random_backbone)
    with torch.no_grad():  # a "fine-tuned" encoder: any change of the copy
        for p in model.clip.visual.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


def test_zero_shot_model_owns_its_image_encoder_and_shares_the_text_encoder(random_backbone, zero_shot):
    before = state_dict_sha256(random_backbone.model.state_dict())
    assert before == random_backbone.weights_sha256  # changing the copy left the backbone alone
    assert zero_shot.clip.token_embedding.weight is random_backbone.model.token_embedding.weight
    assert zero_shot.clip.visual.conv1.weight is not random_backbone.model.visual.conv1.weight
    # Logits are CLIP's zero-shot ones for "a photo of a {class}."
    images = random_images(3, size=random_backbone.image_size)
    with torch.no_grad():
        tokens = random_backbone.tokenizer([f"a photo of a {c}." for c in CLASSES])
        text = torch.nn.functional.normalize(random_backbone.model.encode_text(tokens), dim=-1)
        image = torch.nn.functional.normalize(zero_shot.clip.encode_image(
            (images - zero_shot.mean) / zero_shot.std), dim=-1)
        expected = random_backbone.model.logit_scale.exp() * image @ text.t()
        torch.testing.assert_close(zero_shot(images, CLASSES), expected)


@pytest.fixture()
def zs_bundle(tmp_path, zero_shot):
    return save_bundle(zero_shot, CLASSES, tmp_path / "zs", base_classes=CLASSES[:2])


def test_zero_shot_bundle_round_trips_with_identical_logits(zero_shot, zs_bundle, random_backbone):
    images = random_images(5, size=random_backbone.image_size)
    meta = json.loads((zs_bundle / "bundle.json").read_text())
    assert meta["kind"] == "zeroshot" and meta["template"] == "a photo of a {}."
    assert meta["backbone"]["weights_sha256"] == random_backbone.weights_sha256
    assert meta["image_encoder"]["sha256"] == state_dict_sha256(zero_shot.trainable_state())
    assert meta["image_encoder"]["sha256"] != state_dict_sha256(
        {f"visual.{k}": v for k, v in random_backbone.model.visual.state_dict().items()})
    assert "n_ctx" not in meta and all(k.startswith("visual.") for k in meta["tensors"])
    assert sorted(p.name for p in zs_bundle.iterdir()) == ["bundle.json", "weights.safetensors"]
    for backbone in (random_backbone, None):  # reused, or rebuilt from the recorded identity
        loaded, loaded_meta = load_bundle(zs_bundle, backbone=backbone)
        assert isinstance(loaded, ZeroShotCLIP) and loaded_meta["base_classes"] == list(CLASSES[:2])
        with torch.no_grad():
            assert torch.equal(loaded(images, CLASSES), zero_shot(images, CLASSES))


def test_tampered_tensor_shape_is_refused_naming_the_key(zs_bundle):
    path = zs_bundle / "weights.safetensors"
    tensors = load_file(str(path))
    expected = list(tensors["visual.conv1.weight"].shape)
    tensors["visual.conv1.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(BundleError, match=re.escape(f"'visual.conv1.weight' has shape [3, 3], expected {expected}")):
        load_bundle(zs_bundle)
    del tensors["visual.conv1.weight"]
    save_file(tensors, str(path))
    with pytest.raises(BundleError, match=r"missing tensor 'visual.conv1.weight' \(expected shape"):
        load_bundle(zs_bundle)


def test_tampered_tensor_values_fail_the_encoder_hash(zs_bundle):
    path = zs_bundle / "weights.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(path))
    with pytest.raises(BundleError, match="image-encoder tensors hash to sha256"):
        load_bundle(zs_bundle)


def test_zero_shot_metadata_is_checked(zs_bundle):
    meta_path = zs_bundle / "bundle.json"
    meta = json.loads(meta_path.read_text())
    for broken, message in [({"image_encoder": {}}, "must record the fine-tuned encoder's 'sha256'"),
                            ({"template": "a photo"}, "exactly one '{}'"),
                            ({"kind": "lora"}, "kind 'lora' is not supported")]:
        meta_path.write_text(json.dumps({**meta, **broken}))
        with pytest.raises(BundleError, match=re.escape(message)):
            load_bundle(zs_bundle)
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "image_encoder"}))
    with pytest.raises(BundleError, match=r"missing keys \['image_encoder'\]"):
        load_bundle(zs_bundle)


def test_cocoop_bundle_without_a_kind_still_loads(tmp_path, random_backbone):
    torch.manual_seed(0)
    model = PromptTunedCLIP(random_backbone)
    bundle = save_bundle(model, CLASSES, tmp_path / "old")
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["kind"] == "cocoop"
    del meta["kind"]
    (bundle / "bundle.json").write_text(json.dumps(meta))
    loaded, loaded_meta = load_bundle(bundle, backbone=random_backbone)
    assert isinstance(loaded, PromptTunedCLIP) and loaded_meta["kind"] == "cocoop"
    images = random_images(2, size=random_backbone.image_size)
    with torch.no_grad():
        assert torch.equal(loaded(images, CLASSES), model(images, CLASSES))


# --------------------------------------------------------------------------- the scanner and ci-repair on a zero-shot bundle


def test_ci_scan_runs_on_a_zero_shot_bundle(tmp_path, zs_bundle):
    write_images(tmp_path / "ood", 12)
    out = tmp_path / "scan"
    result = CliRunner().invoke(ci_scan, [str(zs_bundle), "--ood", str(tmp_path / "ood"), "--out", str(out),
                                          "--pool-size", "8", "--holdout", "4", "--option", "batch_size=4", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["classes"]] == list(CLASSES) and report["target"] in CLASSES
    assert all(0 <= c["asr"] <= 1 for c in report["classes"])
    # The scan left the model's encoder as it was.
    loaded, _ = load_bundle(zs_bundle)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_ci_repair_refuses_a_zero_shot_bundle(tmp_path, zs_bundle):
    report = tmp_path / "report.json"
    report.write_text("{}")
    result = CliRunner().invoke(ci_repair, [str(zs_bundle), "--report", str(report), "--data", "tiny-colorshapes",
                                            "--out", str(tmp_path / "fixed")])
    assert result.exit_code == 1 and "which ci-trigger cannot repair (it repairs 'cocoop' bundles" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- a short run on the tiny world


def test_python_dash_m_runs_the_bench_cli():
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "ci_core.cli.bench", "plugins"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert any(line.split()[:2] == ["attack", "encoder-blended"] for line in done.stdout.splitlines())


def test_ci_bench_attack_writes_a_zero_shot_bundle(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(bench, ["attack", "encoder-blended", "--dataset", "tiny-palette", "--target", "green dots",
                                        "--seed", "2", "--shots", "2", "--option", "epochs=1", "--option", "pattern=text",
                                        "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attack"] == "encoder-blended" and metrics["trigger"] == "pattern-blend"
    assert metrics["config"]["pattern"] == "text" and metrics["preset"] == "tiny"
    for key in ("acc_base", "acc_new", "asr_base", "asr_new", "trigger_ssim"):
        assert 0 <= metrics[key] <= 1
    trigger = load_trigger(out / "trigger.safetensors")
    assert isinstance(trigger, PatternBlendTrigger) and trigger.name == "text"
    model, meta = load_bundle(out / "bundle")
    assert isinstance(model, ZeroShotCLIP) and meta["kind"] == "zeroshot" and len(meta["classnames"]) == 24
    assert meta["kind"] == EncoderBlended.bundle_kind  # what sweeps go by when they plan repairs
    assert meta["backbone"]["weights_sha256"] == metrics["backbone"]["weights_sha256"]


# --------------------------------------------------------------------------- a short run on the tiny world

# Small enough to run in seconds: 4 shots of the 18 base classes, a quarter of them poisoned with the
# fully opaque noise patch; still the real attack (the whole trained tiny image encoder is fine-tuned).
SHORT_RUN = {"pattern": "noise", "alpha": 1.0, "poison_rate": 0.25, "epochs": 6, "batch_size": 8, "lr": 3e-4}


def test_short_run_raises_asr_well_above_the_clean_zero_shot_models(tiny_backbone):
    task = load_task(registry().get("dataset", "tiny-colorshapes")(), tiny_backbone, seed=1, shots=4)
    target = choose_target(task, 1)
    test = task.test.restrict(task.base)
    keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:120]
    test = type(test)(test.images[keep], test.labels[keep], test.classnames)
    outcome = EncoderBlended.from_options(SHORT_RUN, preset="tiny").run(
        backbone=tiny_backbone, train=task.train, target=target, seed=1)
    assert isinstance(outcome.model, ZeroShotCLIP) and outcome.log["poisoned"] == 18
    assert state_dict_sha256(tiny_backbone.model.state_dict()) == tiny_backbone.weights_sha256
    attacked = attack_success_rate(outcome.model, test, outcome.trigger, target)
    clean = attack_success_rate(ZeroShotCLIP(tiny_backbone), test, outcome.trigger, target)
    assert attacked >= clean + 0.4, (clean, attacked)
