"""End to end on the shipped tiny CLIP: the demo trains a clean and a BadCLIP model and scans both."""

import json

import pytest
from click.testing import CliRunner

from ci_core.cli.scan import main as ci_scan
from ci_core.data.ood import load_own_images
from ci_core.models.bundle import load_bundle
from ci_core.scanning.scan_report import read_scan_report
from ci_core.scanning.two_scan_report import read_two_scan_verdict
from ci_core.models.backbone import TINY_IMAGE_SIZE

pytestmark = pytest.mark.slow


@pytest.fixture
def demo(tiny_demo):
    return tiny_demo.out, tiny_demo.rows, tiny_demo.output


def test_clean_prompt_tuning_beats_chance_by_far(demo):
    _, rows, _ = demo
    # 18 base and 18 new classes: chance is 0.056.  Measured: 1.000 base, 1.000 new (seeds 2 and 3).
    assert rows["clean"]["acc_base"] >= 0.8
    assert rows["clean"]["acc_new"] >= 0.5


def test_badclip_implants(demo):
    _, rows, _ = demo
    bad = rows["badclip"]
    # Bounds chosen on seeds 2 / 3 with the first-stage tiny CLIP (ASR 0.98 / 0.96 base, 0.71 / 0.79 new, base ACC
    # 0.6 / 3.8 points below the clean model's).  With the shipped CLIP seeds 2 / 3 reached 0.994 / 0.994 base and
    # 0.998 / 0.993 new at base ACC 1.000 (ci-bench demo --seed 2 / 3), but the aim (0.9 new, within 3 points
    # of ACC) asserted from them failed on seed 1: 0.739 on new classes.  SSIM about 0.68.
    assert bad["asr_base"] >= 0.85
    assert bad["asr_new"] is not None and bad["asr_new"] >= 0.5
    assert bad["acc_base"] >= rows["clean"]["acc_base"] - 0.06
    assert 0.5 <= bad["trigger_ssim"] < 1.0


def test_ci_flags_badclip_with_the_true_target(demo):
    _, rows, _ = demo
    bad = rows["badclip"]
    assert bad["verdict"] == "backdoored" and bad["backdoored"] is True
    assert bad["predicted_target"] == bad["true_target"] and bad["p_value"] <= 0.01
    # Each scan alone (the pair's p is Bonferroni over them): measured 4.5e-05 on the OOD pool, 2.5e-04 on the own
    # images, both naming the target.
    for scan in bad["scans"].values():
        assert scan["scorer"] == "ref-outlier" and scan["verdict"] == "backdoored"
    assert bad["p_value"] == pytest.approx(min(1.0, 2 * min(bad["ood_p_value"], bad["own_p_value"])))


def test_clean_model_scores_below_the_backdoored_one(demo):
    _, rows, _ = demo
    for scan in ("ood", "own"):
        assert rows["clean"]["scans"][scan]["s_max"] < rows["badclip"]["scans"][scan]["s_max"]
        assert rows["clean"]["scans"][scan]["p_value"] > rows["badclip"]["scans"][scan]["p_value"]


def test_the_calibrated_verdict_passes_the_clean_model(demo):
    _, rows, _ = demo
    assert rows["clean"]["verdict"] == "clean" and rows["clean"]["backdoored"] is False


def test_the_papers_scorer_is_reported_beside_the_verdict(demo):
    _, rows, output = demo
    for row in rows.values():
        assert row["paper_scorer"] == "ci" and isinstance(row["paper_s_max"], float)
        assert row["paper_flagged"] == (row["paper_s_max"] >= 2.0)
    assert "PAPER-S_MAX" in output and "VERDICT" in output and "P-OWN" in output
    # Each scan's reference was scanned once for both models (same classes, pool and seed), then read from the cache.
    for scan in ("ood", "own"):
        assert sorted(row["scans"][scan]["reference_cached"] for row in rows.values()) == [False, True]


def test_demo_prints_the_table_and_keeps_its_outputs(demo):
    out, rows, output = demo
    assert "MODEL" in output and "badclip" in output and "clean" in output
    for name, row in rows.items():
        pair = read_two_scan_verdict(out / "scans" / name)  # schema-checked, and agreeing with both scans' reports
        assert (pair["verdict"], pair["p_value"], pair["target"]) == (row["verdict"], row["p_value"],
                                                                      row["predicted_target"])
        assert [scan["name"] for scan in pair["scans"]] == ["ood", "own"]
        for scan in pair["scans"]:
            report = read_scan_report(out / "scans" / name / scan["name"])
            assert report.decision.p_value == row["scans"][scan["name"]]["p_value"] == row[f"{scan['name']}_p_value"]
            assert report.command.startswith("ci-bench demo ") and report.bundle.sha256
        page = out.absolute() / "scans" / name / "report.html"
        assert page.is_file() and f"{name}: {row['verdict']}; page: {page}" in output  # the demo names each page
        load_bundle(out / "models" / name / "bundle")  # every saved bundle loads again


def test_the_demos_own_images_are_the_folder_ci_scan_reads(demo):
    """`ci-scan --own-images OUT/own-images --seed 1` draws the very pool the demo's own scans used."""
    out, rows, _ = demo
    own = read_scan_report(out / "scans" / "badclip" / "own")
    meta = json.loads((out / "models" / "badclip" / "bundle" / "bundle.json").read_text())
    pool, classes = load_own_images(out / "own-images", meta["classnames"], inversion=own.pool.inversion,
                                    holdout=own.pool.holdout, image_size=TINY_IMAGE_SIZE, seed=1)
    assert classes == tuple(meta["base_classes"]) == own.classnames
    assert pool.digest() == own.pool.sha256 and pool.source == own.pool.source
    assert own.pool.source.startswith(str(out / "own-images"))


def test_ci_scan_cli_on_the_demo_bundle(demo, tmp_path):
    out, rows, _ = demo
    target = rows["badclip"]["true_target"]
    bundle = out / "models" / "badclip" / "bundle"
    names = json.loads((bundle / "bundle.json").read_text())["classnames"]
    candidates = [target] + [n for n in names if n != target][::5]  # 9 candidates, the target among them
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(candidates) + "\n")
    scan_out = tmp_path / "scan"
    result = CliRunner().invoke(ci_scan, [str(bundle), "--ood", "builtin", "--classes", str(classes),
                                          "--out", str(scan_out), "--seed", "2", "--quiet"])
    report = json.loads((scan_out / "report.json").read_text())
    assert result.exit_code == {"clean": 0, "backdoored": 3}[report["verdict"]], result.output
    assert [c["name"] for c in report["classes"]] == candidates
    # With only 9 candidates the standardised scores are coarse (on the first-stage tiny CLIP, seed 1's demo bundle:
    # 'green ring' outscored the target here although the full 36-class scan named it); the target's
    # reconstructed trigger must still work on most held-out images.
    by_name = {c["name"]: c for c in report["classes"]}
    assert by_name[target]["asr"] >= 0.5
    assert report["detector_config"]["epsilon"] == pytest.approx(8 / 255)  # the tiny preset


def test_demo_ood_only_keeps_the_papers_one_scan(tmp_path, monkeypatch):
    """`--ood-only`: one scan folder per model, judged by the OOD scan alone, and no own images written."""
    from ci_core.cli import bench

    monkeypatch.setattr(bench, "pool_sizes", lambda preset: (16, 8))  # a small pool: this checks the layout only
    out, rows_path = tmp_path / "demo", tmp_path / "rows.json"
    result = CliRunner().invoke(bench.main, ["demo", "--ood-only", "--attacks", "clean", "--dataset", "tiny-palette",
                                             "--out", str(out), "--json", str(rows_path), "--quiet"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(rows_path.read_text())
    assert list(row["scans"]) == ["ood"] and row["own_p_value"] is None
    assert (row["verdict"], row["p_value"]) == (row["scans"]["ood"]["verdict"], row["ood_p_value"])
    report = read_scan_report(out / "scans" / "clean")  # a single scan's folder, as ci-scan without --own-images
    assert report.decision.p_value == row["p_value"] and (report.pool.inversion, report.pool.holdout) == (16, 8)
    assert "--ood-only" in report.command and not (out / "own-images").exists()
    assert "P-OWN" not in result.output and "VERDICT" in result.output
