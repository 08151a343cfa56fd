"""End to end on the shipped tiny CLIP: the demo trains a clean and a BadCLIP model and scans both."""

import json

import pytest
from click.testing import CliRunner

from ci_core.cli.bench import main as ci_bench
from ci_core.cli.scan import main as ci_scan
from ci_core.models.bundle import load_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    rows_path = out.parent / "rows.json"
    result = CliRunner().invoke(ci_bench, ["demo", "--out", str(out), "--json", str(rows_path),
                                           "--attacks", "clean,badclip", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = {row["model"]: row for row in json.loads(rows_path.read_text())}
    return out, rows, result.output


def test_clean_prompt_tuning_is_accurate(demo):
    _, rows, _ = demo
    assert rows["clean"]["acc_base"] >= 0.7
    assert rows["clean"]["acc_new"] >= 0.4


def test_badclip_implants_and_keeps_accuracy(demo):
    _, rows, _ = demo
    bad, clean = rows["badclip"], rows["clean"]
    assert bad["asr_new"] >= 0.8
    assert bad["acc_base"] >= clean["acc_base"] - 0.05
    assert 0.9 <= bad["trigger_ssim"] <= 1.0


def test_ci_flags_badclip_with_the_true_target(demo):
    _, rows, _ = demo
    bad = rows["badclip"]
    assert bad["backdoored"] is True
    assert bad["predicted_target"] == bad["true_target"]


def test_ci_does_not_flag_the_clean_model(demo):
    _, rows, _ = demo
    assert rows["clean"]["backdoored"] is False
    assert rows["clean"]["s_max"] < rows["badclip"]["s_max"]


def test_demo_prints_the_table_and_keeps_its_outputs(demo):
    out, rows, output = demo
    assert "MODEL" in output and "badclip" in output and "clean" in output
    for name in rows:
        report = json.loads((out / "scans" / name / "report.json").read_text())
        assert report["backdoored"] == rows[name]["backdoored"]
        load_bundle(out / "models" / name)  # every saved bundle loads again


def test_ci_scan_cli_on_the_demo_bundle(demo, tmp_path):
    out, rows, _ = demo
    scan_out = tmp_path / "scan"
    result = CliRunner().invoke(ci_scan, [str(out / "models" / "badclip"), "--ood", "builtin", "--out", str(scan_out),
                                          "--seed", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((scan_out / "report.json").read_text())
    assert report["backdoored"] is True and report["target"] == rows["badclip"]["true_target"]
