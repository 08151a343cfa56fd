"""benchmarks/trigger_visibility.py: its probes find a trigger the encoder sees and nothing where there is nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ci_attacks.wanet import WarpTrigger, control_grid
from ci_core.models.bundle import save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.plugins import registry
from ci_core.triggers import AdditiveTrigger

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trigger_visibility.py"


@pytest.fixture(scope="module")
def visibility():
    spec = importlib.util.spec_from_file_location("trigger_visibility", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_and_images(tiny_backbone):
    data = registry().get("dataset", "tiny-colorshapes")()
    images = data.load("test", image_size=tiny_backbone.image_size, seed=0, max_per_class=4).images
    torch.manual_seed(0)
    return PromptTunedCLIP(tiny_backbone, n_ctx=4).eval(), images


def model_dir(tmp_path, model, trigger) -> Path:
    save_bundle(model, ["red circle", "red square"], tmp_path / "bundle")
    trigger.save(tmp_path / "trigger.safetensors")
    return tmp_path


def test_a_strong_additive_trigger_is_found_by_both_probes(visibility, model_and_images, tmp_path):
    model, images = model_and_images
    delta = (torch.rand(3, *images.shape[-2:], generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.25
    trigger = AdditiveTrigger(delta)
    row = visibility.visibility(tmp_path, model, trigger, images, "clean", seed=0)
    assert row.linear_auroc > 0.95 and row.mlp_auroc > 0.95
    assert row.feature_cosine < 0.99 and row.ssim < 0.9


def test_a_trigger_that_changes_nothing_scores_chance(visibility, model_and_images, tmp_path):
    model, images = model_and_images
    row = visibility.visibility(tmp_path, model, AdditiveTrigger(torch.zeros(3, *images.shape[-2:])), images,
                                "clean", seed=0)
    # Clean and "triggered" features are identical, so every held-out pair ties.
    assert row.linear_auroc == pytest.approx(0.5) and row.mlp_auroc == pytest.approx(0.5)
    assert row.feature_cosine == pytest.approx(1.0, abs=1e-5) and row.ssim == pytest.approx(1.0, abs=1e-5)


def test_noise_mode_reference_needs_a_warp_trigger(visibility, model_and_images, tmp_path):
    model, images = model_and_images
    additive = model_dir(tmp_path / "additive", model, AdditiveTrigger(torch.zeros(3, *images.shape[-2:])))
    result = CliRunner().invoke(visibility.main, [str(additive), "--against", "noise-mode", "--images", "20"])
    assert result.exit_code == 1
    assert "needs a warp trigger" in result.output and "'additive'" in result.output
    warp = model_dir(tmp_path / "warp", model, WarpTrigger(control_grid(4, torch.Generator().manual_seed(0)), 1.0))
    result = CliRunner().invoke(visibility.main, [str(warp), "--against", "noise-mode", "--images", "20"])
    assert result.exit_code == 0, result.output
    assert "linear AUROC" in result.output and "warp" in result.output


def test_a_folder_without_a_bundle_is_named(visibility, tmp_path):
    result = CliRunner().invoke(visibility.main, [str(tmp_path)])
    assert result.exit_code == 1 and str(tmp_path) in result.output and "expected bundle" in result.output
