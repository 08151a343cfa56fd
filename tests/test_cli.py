import json

import pytest
import torch
from click.testing import CliRunner

from ci_core.cli.scan import main as ci_scan
from ci_core.errors import DataError
from ci_core.models.bundle import save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_detectors.inspector import CLIPInspector

from test_ood import write_images

CLASSES = ("red circle", "blue square", "green star", "pink ring")


@pytest.fixture()
def bundle(tmp_path, random_backbone):
    torch.manual_seed(0)
    return save_bundle(PromptTunedCLIP(random_backbone), CLASSES, tmp_path / "bundle")


@pytest.fixture()
def ood(tmp_path):
    write_images(tmp_path / "ood", 12)
    return tmp_path / "ood"


def run(args):
    return CliRunner().invoke(ci_scan, [str(a) for a in args])


def test_scan_writes_report_and_triggers(tmp_path, bundle, ood):
    out = tmp_path / "scan"
    result = run([bundle, "--ood", ood, "--out", out, "--pool-size", 8, "--holdout", 4, "--option", "batch_size=4",
                  "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert isinstance(report["backdoored"], bool) and isinstance(report["s_max"], float)
    assert report["target"] in CLASSES
    assert [c["name"] for c in report["classes"]] == list(CLASSES)
    assert set(report["classes"][0]) >= {"name", "asr", "loss", "score", "ssim", "seconds"}
    assert report["detector_config"]["batch_size"] == 4
    assert report["pool"]["inversion"] == 8 and report["pool"]["holdout"] == 4
    assert len(list((out / "triggers").glob("*.png"))) == len(CLASSES)
    assert len(list((out / "triggers").glob("*.safetensors"))) == len(CLASSES)
    assert "report:" in result.output


def test_a_class_file_may_not_name_one_class_twice(tmp_path, bundle, ood):
    classes = tmp_path / "classes.txt"
    classes.write_text("red circle\nyellow moon\nRed_Circle\n")  # one prompt, so one class, to CLIP
    result = run([bundle, "--ood", ood, "--classes", classes])
    assert result.exit_code == 1
    assert "class 3 'Red_Circle' and 'red circle' are one class to CLIP" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--detector", "nope"], "unknown detector 'nope'. Available detectors: ci"),
    (["--detector", "nc"], "pip install ci-detectors-nc"),
    (["--option", "epsilon=-1"], "ci options"),
    (["--option", "nonsense=1"], "unknown option(s) ['nonsense']"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--pool-size", 100], "12 readable images, but the pool needs 104"),
])
def test_bad_options_fail_cleanly(bundle, ood, args, message):
    result = run([bundle, "--ood", ood, "--holdout", 4, *args])
    if "nc" in args and result.exit_code == 0:
        pytest.skip("ci-detectors-nc is installed")
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_bundle_and_empty_ood(tmp_path, bundle):
    result = run([tmp_path / "nothing", "--ood", "builtin"])
    assert result.exit_code == 1 and "a bundle is a directory" in result.output
    (tmp_path / "empty").mkdir()
    result = run([bundle, "--ood", tmp_path / "empty"])
    assert result.exit_code == 1 and "holds no images" in result.output


def test_failed_scan_leaves_nothing_in_out(tmp_path, bundle, ood, monkeypatch):
    calls = []
    original = CLIPInspector.invert

    def failing(self, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise DataError("simulated failure in the second class")
        return original(self, **kwargs)

    monkeypatch.setattr(CLIPInspector, "invert", failing)
    out = tmp_path / "scan"
    result = run([bundle, "--ood", ood, "--out", out, "--pool-size", 8, "--holdout", 4, "--quiet"])
    assert result.exit_code == 1 and "simulated failure" in result.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".scan")] == []


def test_existing_foreign_out_folder_is_not_overwritten(tmp_path, bundle, ood):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("keep me")
    result = run([bundle, "--ood", ood, "--out", out, "--pool-size", 8, "--holdout", 4, "--quiet"])
    assert result.exit_code == 1 and "is not a folder this toolkit wrote" in result.output
    assert (out / "thesis.txt").read_text() == "keep me"


def test_class_file_reading(tmp_path):
    from ci_core.cli.scan import candidate_classes

    meta = {"kind": "cocoop", "classnames": list(CLASSES)}
    path = tmp_path / "classes.txt"
    path.write_text("\ufeff# candidates\nred circle\n\n  # indented comment\n  blue square  \n", encoding="utf-8")
    assert candidate_classes(path, meta) == ("red circle", "blue square")
    path.write_bytes(b"red circle\n\xff\xfe\x00blue square\n")
    with pytest.raises(DataError, match=r"classes.txt: not UTF-8 text"):
        candidate_classes(path, meta)
    path.write_text("red circle\nred circle\nblue square\n")
    with pytest.raises(DataError, match=r"class 2 'red circle' is repeated"):
        candidate_classes(path, meta)
    # The auditor decides the candidates: a class the bundle does not list is scanned like any new class ...
    path.write_text("red circle\npurple moon\n")
    assert candidate_classes(path, meta) == ("red circle", "purple moon")
    # ... except by a CoOp context learned per class, which has no prompt for it.
    with pytest.raises(DataError, match=r"'purple moon' are not classes of the bundle, whose CoOp context is "
                                        r"class-specific"):
        candidate_classes(path, {"kind": "coop", "class_specific": True, "classnames": list(CLASSES)})
    path.write_text("red circle\n")
    with pytest.raises(DataError, match=r"needs at least 2 class names"):
        candidate_classes(path, meta)


def test_tables_show_a_small_p_value_instead_of_zero(capsys):
    from ci_core.cli.common import echo_table

    echo_table([{"p": 0.0002377, "acc": 1.0, "none": None, "flag": True}],
               [("p", "P"), ("acc", "ACC"), ("none", "N"), ("flag", "F")])
    assert capsys.readouterr().out.splitlines()[1].split() == ["2.4e-04", "1.000", "-", "yes"]
