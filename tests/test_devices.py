"""--device, --max-text-batch, --bf16, --backbone and --pretrained on every command."""

import json

import pytest
import torch
from click.testing import CliRunner

from ci_core.cli.bench import main as ci_bench
from ci_core.cli.repair import main as ci_repair
from ci_core.cli.scan import main as ci_scan
from ci_core.models import weights as weights_module
from ci_core.models.bundle import save_bundle
from ci_core.models.cocoop import PromptTunedCLIP

from test_ood import write_images

CLASSES = ("red circle", "blue square", "green star")
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture()
def bundle(tmp_path, random_backbone):
    torch.manual_seed(0)
    return save_bundle(PromptTunedCLIP(random_backbone), CLASSES, tmp_path / "bundle")


def invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])


def commands(bundle, tmp_path):
    """Every command that runs a model, with arguments it would otherwise accept; each writes to tmp_path/out."""
    out = tmp_path / "out"
    return {
        "ci-scan": (ci_scan, [bundle, "--ood", "builtin", "--out", out, "--quiet"]),
        "ci-bench demo": (ci_bench, ["demo", "--out", out, "--quiet"]),
        "ci-bench attack": (ci_bench, ["attack", "clean", "--dataset", "tiny-colorshapes", "--out", out, "--quiet"]),
        "ci-repair": (ci_repair, [bundle, "--report", tmp_path / "report.json", "--data", "builtin", "--out", out,
                                  "--quiet"]),
    }


BAD_RUNTIME = [
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available on this machine",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
    pytest.param(["--device", "cuda:0"], "--device cuda:0: CUDA is not available on this machine",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
    (["--device", "gpu1"], "--device 'gpu1': expected auto, cpu, cuda or cuda:N"),
    (["--device", "cpu", "--bf16"], "--bf16 (bfloat16 autocast) needs a CUDA device"),
    pytest.param(["--bf16"], "--bf16 (bfloat16 autocast) needs a CUDA device, but this machine has no CUDA device",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
    (["--max-text-batch", "0"], "--max-text-batch must be at least 1, got 0"),
]


@pytest.mark.parametrize("name", ["ci-scan", "ci-bench demo", "ci-bench attack", "ci-repair"])
@pytest.mark.parametrize("extra, message", BAD_RUNTIME)
def test_every_command_rejects_an_impossible_device_cleanly(tmp_path, bundle, name, extra, message):
    command, args = commands(bundle, tmp_path)[name]
    result = invoke(command, [*args, *extra])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_scan_on_cpu_in_small_text_chunks_matches_the_automatic_chunking(tmp_path, bundle):
    write_images(tmp_path / "ood", 10)
    reports = {}
    for label, extra in (("auto", ["--device", "auto"]), ("chunked", ["--device", "cpu", "--max-text-batch", 2])):
        out = tmp_path / f"scan-{label}"
        result = invoke(ci_scan, [bundle, "--ood", tmp_path / "ood", "--out", out, "--pool-size", 6, "--holdout", 4,
                                  "--no-reference", "--option", "batch_size=3", "--quiet", *extra])
        assert result.exit_code == 0, result.output
        reports[label] = json.loads((out / "report.json").read_text())
    auto, chunked = reports["auto"], reports["chunked"]
    assert chunked["device"] == "cpu" and auto["device"] == ("cuda" if not NO_CUDA else "cpu")
    assert chunked["backbone"] == auto["backbone"] and chunked["backbone"]["pretrained"] == "random:0"
    for a, c in zip(auto["classes"], chunked["classes"]):  # chunking changes no result beyond rounding
        assert a["name"] == c["name"] and a["asr"] == c["asr"]
        assert a["loss"] == pytest.approx(c["loss"], abs=1e-4)


def test_scan_refuses_other_backbone_weights_showing_both(tmp_path, bundle, random_backbone):
    result = invoke(ci_scan, [bundle, "--ood", "builtin", "--pretrained", "random:1", "--out", tmp_path / "out"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"(random:0, GELU) with weights sha256 {random_backbone.weights_sha256}" in result.output
    assert "given is ci-tiny-clip (random:1, GELU) with weights sha256" in result.output


def test_a_backbone_without_its_weights_named_is_refused(tmp_path):
    result = invoke(ci_bench, ["attack", "clean", "--dataset", "tiny-colorshapes", "--backbone", "ViT-B-16",
                               "--out", tmp_path / "out"])
    assert result.exit_code == 1
    assert "--backbone ViT-B-16 needs --pretrained: one of its open_clip tags (openai," in result.output
    result = invoke(ci_bench, ["demo", "--backbone", "ViT-B-61", "--pretrained", "random:0", "--out", tmp_path / "o"])
    assert result.exit_code == 1 and "unknown open_clip model 'ViT-B-61'. Close matches: ViT-B-16" in result.output


def test_offline_pretrained_tag_fails_in_the_cli_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_module, "cached_pretrained_file", lambda cfg, cache_dir=None: None)
    monkeypatch.setattr(weights_module, "reachable", lambda url, timeout=None: False)
    result = invoke(ci_bench, ["attack", "clean", "--dataset", "tiny-colorshapes", "--backbone", "ViT-B-16",
                               "--pretrained", "openai", "--out", tmp_path / "out"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "unreachable" in result.output and "--pretrained /path/to/weights.safetensors" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, message", [
    pytest.param("cuda", "--device cuda: CUDA is not available on this machine",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
    ("tpu", "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
])
def test_ci_bench_run_rejects_an_impossible_device_before_creating_its_store(tmp_path, device, message):
    result = invoke(ci_bench, ["run", "--out", tmp_path / "store", "--attacks", "clean", "--detectors", "ci",
                               "--seeds", "1", "--device", device, "--quiet"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "store").exists()
