"""Repairs in the benchmark (issue 7, Table 19): planning, keys, resume, zero-shot skips, Ray, the report table.

The sweeps run on the fake plugins of test_bench (instant attacks, four-class
noise images) with the real ci detector on a pool of four images, so that a
repair has a real scan to take its trigger from.
"""

import json
from types import SimpleNamespace
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ci_core.harness import Store, SweepSettings, plan_sweep
from ci_core.harness.report import build_report, implanted_model_level, to_markdown
from ci_core.harness.report.markdown import repair_section
from ci_core.harness.report.tables import _repair_rows, repair_check, repair_labels
from ci_core.harness.records import BackboneKey, ModelSpec, RepairScoring, RepairSpec
from ci_core.harness.store import KINDS, write_json
from ci_core.errors import ConfigError
from ci_core.models.bundle import ZEROSHOT, bundle_sha256, read_meta
from ci_core.plugins import registry
from ci_core.learning.protocol import pool_sizes, preset_for

from test_bench import FAKE_BENCH_PLUGIN, KILL_SCRIPT, assert_store_whole, run_bench
from test_plugins import activate_fake_distribution

REPAIRERS = ("ci-trigger", "clean-only", "random-delta", "wrong-class-delta")

# --------------------------------------------------------------------------- planning


def settings(**changes):
    values = dict(attacks=("clean", "badclip", "encoder-blended"), detectors=("ci",), datasets=("tiny-palette",),
                  seeds=(1, 2), shots=4)
    values.update(changes)
    return SweepSettings(**values)


def test_repairs_add_cells_without_changing_model_or_scan_keys(tiny_backbone):
    plugins = registry()
    inversion, _ = pool_sizes(preset_for(tiny_backbone))
    ablation = dict(pool_sizes=(8, inversion), losses=("ce", "margin"))  # the default (margin, preset |D|) not first
    without = plan_sweep(settings(**ablation), tiny_backbone, plugins)
    plan = plan_sweep(settings(**ablation, repairers=REPAIRERS), tiny_backbone, plugins)
    assert [c.key for c in plan.models] == [c.key for c in without.models]
    assert [c.key for c in plan.scans] == [c.key for c in without.scans]
    assert without.repairs == () and without.skipped_repairs == () and "skipped_repairs" not in without.describe()

    # Only badclip is repaired: clean has no backdoor, encoder-blended writes zero-shot bundles.
    assert {c.spec.repairer for c in plan.repairs} == set(REPAIRERS) and len(plan.repairs) == 4 * 2
    assert all(c.label.endswith(f"repair of badclip/tiny-palette/seed {c.spec.seed}") for c in plan.repairs)
    assert plugins.get("attack", "encoder-blended").bundle_kind == ZEROSHOT
    skipped = {s.attack: s for s in plan.skipped_repairs}
    assert set(skipped) == {"clean", "encoder-blended"}
    assert all(s.repairers == REPAIRERS for s in skipped.values())
    assert "'zeroshot' bundles" in skipped["encoder-blended"].reason and "no backdoor" in skipped["clean"].reason
    assert plan.describe()["skipped_repairs"][1]["attack"] == "encoder-blended"

    # Each repair follows its model and the ci scan at the default setting, and comes after both.
    scans = {c.key: c for c in plan.scans}
    order = [c.key for c in plan.cells()]
    for repair in plan.repairs:
        scan = scans[repair.scan_key]
        assert scan.model_key == repair.model_key == repair.spec.model and repair.spec.scan == scan.key
        variant = scan.variant
        assert (variant["pool_size"], variant["loss"], variant["inversion_data"]) == (inversion, "margin", "ood")
        assert order.index(repair.key) > max(order.index(repair.model_key), order.index(repair.scan_key))
    assert plan.repair_setting["pool_size"] == inversion
    # Not swept at its default: the first value given.
    other = plan_sweep(settings(pool_sizes=(16, 8), repairers=("ci-trigger",)), tiny_backbone, plugins)
    assert other.repair_setting["pool_size"] == 16


def test_repair_keys_follow_what_determines_the_repair(tiny_backbone):
    plugins = registry()
    base = plan_sweep(settings(repairers=REPAIRERS), tiny_backbone, plugins)
    keys = {c.key for c in base.repairs}
    assert len(keys) == len(base.repairs)
    assert {c.key for c in plan_sweep(settings(repairers=REPAIRERS), tiny_backbone, plugins).repairs} == keys
    changes = {
        "repair shots": settings(repairers=REPAIRERS, repair_shots=2),
        "repairer option": settings(repairers=REPAIRERS, repairer_options={"ci-trigger": {"epochs": 1}}),
        "its scan": settings(repairers=REPAIRERS, detector_options={"ci": {"lr": 0.05}}),
        "its model": settings(repairers=REPAIRERS, attack_options={"badclip": {"epochs": 3}}),
    }
    for what, changed in changes.items():
        plan = plan_sweep(changed, tiny_backbone, plugins)
        new = {c.key for c in plan.repairs}
        if what == "repairer option":  # the other three repairers keep their keys
            assert len(new - keys) == 2 and all(k.startswith("ci-trigger-") for k in new - keys), what
        else:
            assert not new & keys, what


@pytest.mark.parametrize("change, message", [
    ({"repairers": ("nope",)},
     "unknown repairer 'nope'. Available repairers: ci-trigger, clean-only, random-delta, wrong-class-delta"),
    ({"repairers": ("ci-trigger",), "repairer_options": {"clean-only": {"epochs": 1}}},
     "--repairer-option: clean-only is not in this sweep"),
    ({"repairer_options": {"ci-trigger": {"epochs": 1}}},
     r"--repairer-option: ci-trigger is not in this sweep \(it has none\)"),
    ({"repairers": ("ci-trigger",), "repairer_options": {"ci-trigger": {"steps": 1}}}, "unknown option"),
])
def test_bad_repair_settings_are_named(tiny_backbone, change, message):
    with pytest.raises(Exception, match=message):
        plan_sweep(settings(**change), tiny_backbone, registry())


@pytest.mark.parametrize("change, message", [
    ({"repairers": ("ci-trigger",), "detectors": ("other",)}, "--repairers: a repair takes its trigger from the 'ci'"),
    ({"repairers": ("ci-trigger",), "repair_shots": 5}, "--repair-shots 5 is more than --shots 4"),
    ({"repairers": ("ci-trigger", "ci-trigger")}, "--repairers: duplicate values"),
])
def test_bad_repair_values(change, message):
    with pytest.raises(ConfigError, match=message):
        settings(**change)


def test_cli_names_a_bad_repairer_and_the_available_ones(tmp_path):
    result = run_bench(["run", "--out", tmp_path / "store", "--attacks", "badclip", "--detectors", "ci",
                        "--repairers", "ci-trigger,nope", "--dry-run"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "unknown repairer 'nope'" in result.output
    assert "Available repairers: ci-trigger, clean-only, random-delta, wrong-class-delta" in result.output
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- sweeps on fake plugins

FAKE_REPAIR_PLUGIN = FAKE_BENCH_PLUGIN.replace("    register(FakeBackdoor)\n",
                                               "    register(FakeBackdoor)\n    register(FakeZeroShot)\n") + '''

class FakeZeroShot(Attack):
    """The backbone as a zero-shot classifier and a constant trigger: a 'zeroshot' bundle, instantly."""

    name = "fake-zeroshot"
    description = "instant stand-in for an encoder-level attack"
    bundle_kind = "zeroshot"

    def run(self, *, backbone, train, target, seed, progress=None):
        from ci_core.models.zeroshot import ZeroShotCLIP

        trigger = AdditiveTrigger(torch.full((3, *train.images.shape[-2:]), 0.05))
        return AttackOutcome(model=ZeroShotCLIP(backbone), trigger=trigger, log={})
'''


@pytest.fixture()
def fake_plugins(tmp_path, monkeypatch):
    yield activate_fake_distribution(tmp_path / "site", monkeypatch, "fake_repair_plugin", FAKE_REPAIR_PLUGIN)
    registry.cache_clear()


BASE = ["run", "--detectors", "ci", "--datasets", "fake-shapes", "--seeds", "1", "--shots", "2", "--pool-sizes", "4",
        "--holdout", "4", "--threads", "1"]
SWEEP = [*BASE, "--attacks", "clean,fake-backdoor,fake-zeroshot", "--attack-option", "clean.epochs=1"]
WITH_REPAIRS = ["--repairers", ",".join(REPAIRERS), "--repair-shots", "1"]


def cell_files(store_dir):
    """The finished cells' files and their modification times."""
    return {p: p.stat().st_mtime_ns for sub in KINDS.values() for p in Path(store_dir).glob(f"{sub}/*/cell.json")}


def test_dry_run_lists_repair_cells_and_the_skipped_attacks(tmp_path, fake_plugins):
    result = run_bench([*SWEEP, *WITH_REPAIRS, "--out", tmp_path / "store", "--dry-run"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.startswith("repair ")]
    assert [row[1] for row in rows] == list(REPAIRERS)
    assert all("fake-backdoor/fake-shapes/seed" in " ".join(row) for row in rows)
    assert "repairs use the ci scan at [|D|=4, batch 4, margin, ood]" in result.output
    assert "no repair cells for fake-zeroshot (ci-trigger, clean-only, random-delta, wrong-class-delta): its models " \
           "are 'zeroshot' bundles" in result.output
    assert "no repair cells for clean" in result.output
    assert "12 cells (3 models, 3 scans, 1 references, 4 repairs, 1 floors), 0 already stored" in result.output
    [floor] = [line for line in result.output.splitlines() if line.startswith("floor ")]
    assert "floor of fake-backdoor/fake-shapes/seed 1 (clean seed 1)" in floor
    assert not (tmp_path / "store").exists()


def test_repairs_reuse_an_earlier_store_and_resume_after_kill(tmp_path, fake_plugins):
    out = tmp_path / "store"
    # A store made without repairs ...
    first = run_bench([*SWEEP, "--out", out, "--quiet"])
    assert first.exit_code == 0, first.output
    assert "7 cells run, 0 reused" in first.output
    earlier = cell_files(out)
    assert len(earlier) == 7

    # ... gets repairs added; this run is killed (-9) between writing random-delta's cell and publishing it.
    env = {**os.environ, "FAKE_BENCH_KILL_BEFORE": "random-delta-fake-backdoor"}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *SWEEP, *WITH_REPAIRS, "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=1800)
    assert killed.returncode == -9, killed.stderr
    assert "12 cells (3 models, 3 scans, 1 references, 4 repairs, 1 floors): 7 already in" in killed.stderr
    assert "no repair cells for fake-zeroshot" in killed.stderr
    repaired = sorted(p.name.rsplit("-", 1)[0] for p in (out / "repairs").iterdir())
    assert repaired == ["ci-trigger-fake-backdoor-fake-shapes-s1", "clean-only-fake-backdoor-fake-shapes-s1"]
    assert {p: t for p, t in cell_files(out).items() if p in earlier} == earlier  # models and scans reused as-is
    done = cell_files(out)

    resumed = run_bench([*SWEEP, *WITH_REPAIRS, "--out", out])
    assert resumed.exit_code == 0, resumed.output
    assert "deleted 1 half-written cell(s)" in resumed.output
    assert "3 cells run, 9 reused from the store, 0 failed" in resumed.output  # two repairs and the floor
    assert {p: t for p, t in cell_files(out).items() if p in done} == done  # finished repairs untouched
    assert_store_whole(out)
    again = run_bench([*SWEEP, *WITH_REPAIRS, "--out", out, "--quiet"])
    assert again.exit_code == 0 and "0 cells run, 12 reused" in again.output

    store = Store.open(out)
    model = next(m for m in store.cells("model") if m.attack == "fake-backdoor")
    scan = next(s for s in store.cells("scan") if s.attack == "fake-backdoor")
    repairs = {r.repairer: r for r in store.cells("repair")}
    assert set(repairs) == set(REPAIRERS)
    for name, record in repairs.items():
        assert record.model == model.key and record.scan == scan.key
        assert record.before == model.metrics and record.true_target == model.target
        assert record.scan_target == scan.predicted_target
        assert record.clean_images == 2  # --repair-shots 1 of each of the two base classes
        assert all(0 <= record.after[k] <= 1 for k in ("acc_base", "acc_new", "asr_base", "asr_new"))
        bundle = store.bundle_path("repair", record.key)
        assert read_meta(bundle)["kind"] == "cocoop" and bundle_sha256(bundle) == record.bundle_sha256
        assert record.bundle_sha256 != model.bundle_sha256
    # The floor: the backdoored model's own trigger on the clean model of its dataset and seed, its test images.
    [floor] = store.cells("floor")
    clean = next(m for m in store.cells("model") if m.attack == "clean")
    assert (floor.model, floor.clean_model, floor.clean_seed, floor.target) == (model.key, clean.key, 1, model.target)
    assert floor.metrics["acc_base"] == pytest.approx(clean.metrics["acc_base"])  # the clean model, same test images
    assert all(0 <= floor.metrics[k] <= 1 for k in ("asr_base", "asr_new"))
    assert repairs["clean-only"].repair_trigger_class is None
    assert repairs["ci-trigger"].repair_trigger_class == scan.predicted_target
    assert repairs["wrong-class-delta"].repair_trigger_class != scan.predicted_target

    report = run_bench(["report", out])
    assert report.exit_code == 0, report.output
    assert "## Repair (Table 19)" in report.output
    assert "- fake-zeroshot (ci-trigger, clean-only, random-delta, wrong-class-delta): its models are 'zeroshot'" \
           in report.output
    data = json.loads((out / "report" / "report.json").read_text())
    assert data["counts"]["repairs"] == 4 and data["failures"] == [] and data["pending"] == []
    row = next(r for r in data["repairs"] if r["repairer"] == "ci-trigger")
    assert row["asr_unseen_after"]["mean"] == pytest.approx(repairs["ci-trigger"].after["asr_new"])
    assert row["acc_seen_before"]["mean"] == pytest.approx(model.metrics["acc_base"])


def test_a_failed_model_fails_its_scan_and_repairs_and_the_sweep_goes_on(tmp_path, fake_plugins):
    out = tmp_path / "store"
    result = run_bench([*BASE, "--attacks", "fake-backdoor,fake-zeroshot", "--attack-option",
                        "fake-backdoor.fail=true", "--repairers", "ci-trigger", "--repair-shots", "1", "--out", out])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "3 cells run, 0 reused from the store, 3 failed" in result.output
    failures = {f["kind"]: f for f in Store.open(out).failures()}
    assert set(failures) == {"model", "scan", "repair"}
    assert "its model cell fake-backdoor/fake-shapes/seed 1 failed" in failures["repair"]["error"]
    assert len(list((out / "models").iterdir())) == 1  # the zero-shot model and its scan still ran


def test_a_repair_of_an_unscannable_model_is_declined_not_failed(tmp_path, fake_plugins):
    out = tmp_path / "store"
    sweep = [*BASE, "--attacks", "fake-backdoor", "--attack-option", "fake-backdoor.broken=true", "--repairers",
             "ci-trigger,clean-only", "--repair-shots", "1", "--out", out]
    result = run_bench(sweep)
    assert result.exit_code == 0, result.output
    assert "3 cells run, 0 reused from the store, 2 with nothing to do (recorded under" in result.output
    assert "nothing to do for repair ci-trigger repair of fake-backdoor/fake-shapes/seed 1: its scan could not " \
           "measure the model" in result.output
    store = Store.open(out)
    assert store.failures() == [] and store.cells("repair") == []
    assert {d["spec"]["repairer"] for d in store.declines()} == {"ci-trigger", "clean-only"}
    assert [s.verdict for s in store.cells("scan")] == ["unscannable"]

    again = run_bench(sweep)  # settled: not run again
    assert again.exit_code == 0, again.output
    assert "5 cells (1 models, 1 scans, 1 references, 2 repairs): 5 already in" in again.output
    assert "(2 of them with nothing to do), 0 to run" in again.output and "0 cells run" in again.output

    report = run_bench(["report", out])
    assert report.exit_code == 0, report.output
    data = json.loads((out / "report" / "report.json").read_text())
    assert data["failures"] == [] and data["pending"] == []
    [skipped] = data["skipped_repairs"]
    assert skipped["attack"] == "fake-backdoor" and skipped["repairers"] == ["ci-trigger", "clean-only"]
    assert skipped["reason"].startswith("fake-backdoor/fake-shapes/seed 1: its scan could not measure the model (")
    assert "no reconstructed trigger to repair with" in (out / "report" / "report.md").read_text()


def comparable_repairs(store_dir):
    drop = ("seconds", "cpu_seconds", "repair_seconds", "repair_cpu_seconds")
    return {r.key: {k: v for k, v in r.to_json().items() if k not in drop} for r in Store.open(store_dir).cells("repair")}


def test_repairs_run_alike_on_ray(tmp_path, fake_plugins):
    pytest.importorskip("ray")
    sweep = [*BASE, "--attacks", "fake-backdoor", "--repairers", "ci-trigger,clean-only", "--repair-shots", "1",
             "--quiet"]
    local = run_bench([*sweep, "--out", tmp_path / "local"])
    assert local.exit_code == 0, local.output
    on_ray = run_bench([*sweep, "--out", tmp_path / "ray", "--executor", "ray", "--ray-cpus", "1"])
    assert on_ray.exit_code == 0, on_ray.output
    assert "5 cells run, 0 reused" in on_ray.output
    a, b = comparable_repairs(tmp_path / "local"), comparable_repairs(tmp_path / "ray")
    assert len(a) == 2 and a == b  # same keys, same repaired bundles, same ACC and ASR


# --------------------------------------------------------------------------- the report table from hand-made cells


def put_cell(store, kind, record):
    """File a hand-made cell record as a sweep would: whole, with its manifest."""
    with store.writing(kind, record["key"]) as work:
        write_json(work / "cell.json", record)


def test_report_repair_table_from_hand_made_cells(tmp_path):
    store = Store.open(tmp_path / "store", create=True)
    rng = np.random.default_rng(0)
    metrics = ("acc_base", "acc_new", "asr_base", "asr_new")
    backbone = BackboneKey(name="ci-tiny-clip", weights_sha256="0" * 64)
    cells = []
    for attack in ("badclip", "wanet"):
        for seed in (1, 2, 3):
            model_key = f"{attack}-s{seed}"
            before = {m: float(rng.uniform()) for m in metrics} | {"trigger_ssim": 0.9}
            model_spec = ModelSpec(dataset="tiny-palette", seed=seed, shots=1, test_per_class=None, attack=attack,
                                   attack_config={}, backdoor=True, backbone=backbone)
            put_cell(store, "model", {
                "kind": "model", "key": model_key, "label": model_key, "spec": model_spec.to_json(),
                "dataset": "tiny-palette", "attack": attack, "seed": seed, "target": "red stripes",
                "metrics": before, "trigger": "additive", "bundle_sha256": "0" * 64, "seconds": 1.0})
            for repairer in ("ci-trigger", "clean-only"):
                repair_spec = RepairSpec(model=model_key, scan="s", seed=seed, repairer=repairer, repairer_config={},
                                         repair_shots=4, backbone=backbone,
                                         scoring=RepairScoring(scorer="ci", config={}, reference=None))
                record = {"kind": "repair", "key": f"{repairer}-{model_key}", "label": "", "spec": repair_spec.to_json(),
                          "repair_trigger_class": "red stripes", "clean_images": 4, "bundle_sha256": "0" * 64,
                          "model": model_key, "scan": "s", "dataset": "tiny-palette", "attack": attack, "seed": seed,
                          "repairer": repairer, "true_target": "red stripes",
                          "scan_target": "red stripes" if seed < 3 else "blue dots", "before": before,
                          "after": {m: float(rng.uniform()) for m in metrics} | {"trigger_ssim": 0.9},
                          "repair_seconds": float(seed), "repair_cpu_seconds": 2.0 * seed}
                put_cell(store, "repair", record)
                cells.append(record)
    write_json(store.root / "plans" / "p.json", {"cells": [], "skipped_repairs": [
        {"attack": "encoder-blended", "repairers": ["ci-trigger", "clean-only"], "reason": "zeroshot bundles"}]})

    report = build_report(store)
    rows = {(r["repairer"], r["attack"], r["dataset"]): r for r in report["repairs"]}
    assert list(rows) == [("ci-trigger", "badclip", "tiny-palette"), ("ci-trigger", "wanet", "tiny-palette"),
                          ("ci-trigger", "all", "all"), ("clean-only", "badclip", "tiny-palette"),
                          ("clean-only", "wanet", "tiny-palette"), ("clean-only", "all", "all")]
    for (repairer, attack, _), row in rows.items():
        part = [c for c in cells if c["repairer"] == repairer and attack in ("all", c["attack"])]
        assert row["models"] == len(part)
        for column, field in (("acc_seen", "acc_base"), ("acc_unseen", "acc_new"), ("asr_seen", "asr_base"),
                              ("asr_unseen", "asr_new")):
            for when in ("before", "after"):
                values = [c[when][field] for c in part]
                assert row[f"{column}_{when}"]["mean"] == pytest.approx(np.mean(values))
                assert row[f"{column}_{when}"]["std"] == pytest.approx(np.std(values, ddof=1))
        assert row["scan_hit"] == pytest.approx(2 / 3)
        assert row["repair_seconds"]["mean"] == pytest.approx(2.0)
    assert report["skipped_repairs"] == [{"attack": "encoder-blended", "repairers": ["ci-trigger", "clean-only"],
                                          "reason": "zeroshot bundles"}]
    markdown = to_markdown(report)
    table = markdown.split("## Repair (Table 19)")[1].split("## Failed cells")[0]
    assert "| repairer | attack | dataset | models | ACC seen before | ACC seen after |" in table
    ci_all = rows[("ci-trigger", "all", "all")]["asr_unseen_after"]
    assert f"{ci_all['mean']:.3f} ± {ci_all['std']:.3f}" in table
    assert "- encoder-blended (ci-trigger, clean-only): zeroshot bundles" in table


# --------------------------------------------------------------------------- model level over implanted backdoors


def scan_row(target, s_max, asr_new, predicted, k=2.0):
    """A scored scan with just what the model-level figures read."""
    metrics = {"asr_new": asr_new}
    return SimpleNamespace(true_target=target, s_max=s_max, backdoored=s_max >= k, predicted_target=predicted,
                           implanted=lambda level: target is not None and (asr_new or 0.0) >= level, metrics=metrics)


def test_model_level_over_implanted_backdoors_by_hand():
    rows = [scan_row(None, 2.5, None, "a"), scan_row(None, 1.0, None, "b"),
            scan_row("t", 3.0, 0.9, "t"), scan_row("t", 2.0, 0.6, "u"), scan_row("t", 0.5, 0.1, "t")]
    half = implanted_model_level(rows, 0.5)
    # kept: both clean models and the two backdoors at 0.9 and 0.6; 3 of the 4 (backdoored, clean) pairs ordered
    assert (half["backdoored"], half["clean"]) == (2, 2)
    assert half["auroc"] == pytest.approx(0.75) and half["tpr"] == 1.0 and half["top_is_target"] == 0.5
    strong = implanted_model_level(rows, 0.8)
    assert (strong["backdoored"], strong["auroc"], strong["top_is_target"]) == (1, 1.0, 1.0)
    none = implanted_model_level(rows, 0.95)
    assert (none["backdoored"], none["clean"], none["auroc"], none["tpr"], none["top_is_target"]) == (0, 2, None,
                                                                                                      None, None)
    every = implanted_model_level(rows, 0.0)
    assert every["backdoored"] == 3 and every["auroc"] == pytest.approx(3 / 6) and every["tpr"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- the repair aim and the controls


def repair_record(attack, repairer, before, after, acc=(1.0, 1.0), scan_target="t", scan="scan"):
    """A repair record with just what ``repair_check`` reads: ASR (seen, unseen) before and after, ACC seen."""
    return SimpleNamespace(model=f"{attack}-model", repairer=repairer, attack=attack, dataset="tiny-palette", seed=1,
                           true_target="t", scan_target=scan_target, scan=scan,
                           before={"asr_base": before[0], "asr_new": before[1], "acc_base": acc[0]},
                           after={"asr_base": after[0], "asr_new": after[1], "acc_base": acc[1]})


def test_repairs_of_one_model_from_two_scans_are_checked_apart_against_their_own_controls():
    # The same model repaired with the OOD scan's trigger and with the base-class scan's (docs/repair.md): each
    # repair is compared with the controls run from its own scan, and the rows say which scan.
    records = [
        repair_record("badclip", "ci-trigger", (0.99, 0.0), (0.29, 0.0), scan="ood-scan"),
        repair_record("badclip", "clean-only", (0.99, 0.0), (0.31, 0.0), scan="ood-scan"),
        repair_record("badclip", "ci-trigger", (0.99, 0.0), (0.18, 0.0), scan="base-scan"),
        repair_record("badclip", "clean-only", (0.99, 0.0), (0.40, 0.0), scan="base-scan"),
    ]
    scans = [SimpleNamespace(key=key, spec=SimpleNamespace(pool=SimpleNamespace(inversion_data=data), classes=which))
             for key, data, which in (("ood-scan", "ood", "all"), ("base-scan", "task", "base"))]
    label = repair_labels(records, scans)
    check = repair_check(records, controls={"clean-only"}, label=label)
    rows = {row["repairer"]: row for row in check["models"]}
    assert set(rows) == {"ci-trigger [ood/all scan]", "ci-trigger [task/base scan]"}
    assert rows["ci-trigger [ood/all scan]"]["left_by_clean-only"] == 0.31
    assert rows["ci-trigger [ood/all scan]"]["beats_controls"] is False  # 0.29 against 0.31: within the noise
    assert rows["ci-trigger [task/base scan]"]["left_by_clean-only"] == 0.40
    assert rows["ci-trigger [task/base scan]"]["beats_controls"] is True
    timed = [SimpleNamespace(**vars(r), repair_seconds=1.0, repair_cpu_seconds=1.0) for r in records]
    assert {r["repairer"] for r in _repair_rows(timed, label)} == {
        "ci-trigger [ood/all scan]", "ci-trigger [task/base scan]", "clean-only [ood/all scan]",
        "clean-only [task/base scan]"}
    # one kind of scan: the plain repairer names, as before
    assert repair_labels(records[:2], scans)(records[0]) == "ci-trigger"


def test_repair_check_counts_removed_backdoors_and_beaten_controls_by_hand():
    records = [
        # works on seen classes; removed, but random-delta left less (0.04 against 0.05): not beaten
        repair_record("badclip", "ci-trigger", (0.9, 0.3), (0.05, 0.02), acc=(1.0, 0.99)),
        repair_record("badclip", "clean-only", (0.9, 0.3), (0.8, 0.5)),
        repair_record("badclip", "random-delta", (0.9, 0.3), (0.04, 0.0)),
        # works on unseen classes only; not removed (0.2 seen left), but less than both controls
        repair_record("siba", "ci-trigger", (0.3, 0.6), (0.2, 0.0), scan_target="other"),
        repair_record("siba", "clean-only", (0.3, 0.6), (0.5, 0.1)),
        repair_record("siba", "random-delta", (0.3, 0.6), (0.0, 0.3)),
        # does not work: left out
        repair_record("wanet", "ci-trigger", (0.1, 0.05), (0.0, 0.0)),
        # ASR gone but 5 points of ACC lost: not removed; no control ran on it
        repair_record("blended", "ci-trigger", (1.0, 1.0), (0.0, 0.01), acc=(1.0, 0.95)),
    ]
    check = repair_check(records, controls={"clean-only", "random-delta"})
    models = {row["attack"]: row for row in check["models"]}
    assert set(models) == {"badclip", "siba", "blended"} and {r["repairer"] for r in check["models"]} == {"ci-trigger"}
    assert models["badclip"]["removed"] and models["badclip"]["beats_controls"] is False
    assert models["badclip"]["left_by_clean-only"] == 0.8 and models["badclip"]["left_by_random-delta"] == 0.04
    assert models["badclip"]["acc_seen_change"] == pytest.approx(-0.01)
    assert not models["siba"]["removed"] and models["siba"]["beats_controls"] is True
    assert models["siba"]["scan_hit"] is False and models["badclip"]["scan_hit"] is True
    assert not models["blended"]["removed"] and models["blended"]["beats_controls"] is None
    attacks = {row["attack"]: row for row in check["attacks"]}
    assert [r["attack"] for r in check["attacks"]] == ["badclip", "blended", "siba", "all"]
    assert (attacks["badclip"]["removed"], attacks["badclip"]["beats_controls"]) == ("1/1", "0/1")
    assert (attacks["siba"]["removed"], attacks["siba"]["beats_controls"]) == ("0/1", "1/1")
    assert (attacks["blended"]["removed"], attacks["blended"]["beats_controls"]) == ("0/1", "0/0")
    assert (attacks["all"]["removed"], attacks["all"]["beats_controls"]) == ("1/3", "1/2")
    assert attacks["all"]["asr_seen_after"]["mean"] == pytest.approx((0.05 + 0.2 + 0.0) / 3)
    # Leaving less by a margin within the test set's noise (0.03 < BEATS_BY) is not beating a control.
    close = [repair_record("blended", "ci-trigger", (1.0, 1.0), (0.97, 0.9)),
             repair_record("blended", "clean-only", (1.0, 1.0), (1.0, 1.0))]
    assert repair_check(close, controls={"clean-only"})["models"][0]["beats_controls"] is False
    report = {"repairs": [{"repairer": "ci-trigger"}], "skipped_repairs": [], "repair_check": check}
    table = "\n".join(repair_section(report))
    assert "### Working backdoors: the aim and the controls" in table
    assert "| ci-trigger | siba | 1 | 0/1 | 1/1 |" in table and "left by clean-only" in table


def test_repair_check_measures_each_repair_against_its_floor_by_hand():
    records = [repair_record("badclip", "ci-trigger", (0.98, 0.6), (0.21, 0.02)),  # above the aim, below the floor
               repair_record("blended", "ci-trigger", (1.0, 1.0), (0.90, 0.4)),  # far above a floor of 0
               repair_record("siba", "ci-trigger", (0.7, 0.5), (0.30, 0.0), acc=(1.0, 0.95)),  # at it, 5 ACC points lost
               repair_record("wanet", "ci-trigger", (0.9, 0.9), (0.3, 0.3))]  # no clean model: no floor
    floors = [SimpleNamespace(model=f"{attack}-model", metrics={"asr_base": seen, "asr_new": unseen})
              for attack, seen, unseen in (("badclip", 0.28, 0.015), ("blended", 0.0, 0.0), ("siba", 0.27, 0.02))]
    check = repair_check(records, controls=(), floors=floors)
    models = {row["attack"]: row for row in check["models"]}
    assert (models["badclip"]["floor_seen"], models["badclip"]["floor_unseen"]) == (0.28, 0.015)
    assert models["badclip"]["at_floor"] is True and models["badclip"]["removed"] is False
    assert models["blended"]["at_floor"] is False and models["siba"]["at_floor"] is False
    assert models["wanet"]["at_floor"] is None and models["wanet"]["floor_seen"] is None
    attacks = {row["attack"]: row["at_floor"] for row in check["attacks"]}
    assert attacks == {"badclip": "1/1", "blended": "0/1", "siba": "0/1", "wanet": "0/0", "all": "1/3"}
    # Within BEATS_BY of the floor counts as at it: 0.33 left against a floor of 0.28.
    near = repair_check([repair_record("badclip", "ci-trigger", (0.98, 0.6), (0.33, 0.0))], (), floors)
    assert near["models"][0]["at_floor"] is True
    table = "\n".join(repair_section({"repairs": [{"repairer": "ci-trigger"}], "skipped_repairs": [],
                                      "repair_check": check}))
    assert "at the floor" in table and "| ci-trigger | all | 4 | 0/4 | 0/0 | 1/3 |" in table


def test_the_anomaly_figure_draws_an_attack_whose_every_model_was_unscannable(tmp_path):
    from ci_core.harness.report.figures import plot_anomaly_scores

    attacks = [{"attack": "clean", "s_max": {"mean": 1.5, "std": 0.2}},
               {"attack": "tripwire", "s_max": {"mean": None, "std": None}},  # every model unscannable
               {"attack": "badclip", "s_max": {"mean": 5.0, "std": None}}]
    report = {"detectors": [{"label": "ci / ref-outlier", "anomaly_by_attack": attacks, "model_level": {"k": None}}]}
    assert plot_anomaly_scores(report, tmp_path / "anomaly.png")
    assert (tmp_path / "anomaly.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
