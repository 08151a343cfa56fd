"""ci-scan, unchanged, on a real architecture: a ViT-B/16 CoCoOp bundle with random weights."""

import json

import torch
from click.testing import CliRunner
from PIL import Image

from ci_core.cli.scan import main as ci_scan
from ci_core.models.backbone import load_backbone
from ci_core.models.bundle import load_bundle, save_bundle
from ci_core.models.cocoop import PromptTunedCLIP

from test_ood import write_images

CLASSES = ("golden retriever", "fire truck", "sunflower")


def test_scan_of_a_random_vit_b_16_bundle_writes_a_valid_report(tmp_path):
    backbone = load_backbone("ViT-B-16", "random:0")
    assert backbone.image_size == 224 and backbone.text_width == 512 and backbone.embed_dim == 512
    torch.manual_seed(0)
    bundle = save_bundle(PromptTunedCLIP(backbone), CLASSES, tmp_path / "vit-b-16")
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["backbone"]["name"] == "ViT-B-16" and meta["backbone"]["pretrained"] == "random:0"
    assert meta["image"]["size"] == 224 and meta["tensors"]["prompt_learner.ctx"] == [4, 512]
    write_images(tmp_path / "ood", 3)  # small PNGs, resized to 224 by the pool

    out = tmp_path / "scan"
    result = CliRunner().invoke(ci_scan, [str(bundle), "--ood", str(tmp_path / "ood"), "--out", str(out),
                                          "--pool-size", "1", "--holdout", "1", "--option", "batch_size=1",
                                          "--device", "cpu", "--no-reference", "--quiet"])
    assert result.exit_code in (0, 3), result.output  # clean or backdoored: a verdict, not an error
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["classes"]] == list(CLASSES)
    assert report["target"] in CLASSES and isinstance(report["backdoored"], bool) and report["scorer"] == "ci"
    assert report["backbone"] == backbone.identity() and report["preset"] is None  # the paper's settings ...
    assert report["detector_config"]["epsilon"] == 4 / 255  # ... with its 4/255 budget
    assert report["pool"]["inversion"] == 1 and report["pool"]["holdout"] == 1
    for row in report["classes"]:
        assert row["asr"] in (0.0, 1.0) and 0 < row["ssim"] <= 1 and row["loss"] == row["loss"]  # not NaN
    strip = Image.open(out / "triggers" / "000_golden_retriever.png")
    assert strip.width > 224 and strip.height > 2 * 224  # a clean and a triggered 224-pixel image
    model, _ = load_bundle(bundle, backbone=backbone)  # the bundle still loads against its backbone
    assert model.shared_prefix  # ViT-B/16's text blocks take the shared-prefix path
