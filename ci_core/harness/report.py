"""``ci-bench report``: the paper's tables and figures from the finished cells of a store.

Every scan's stored per-class evidence is scored again here, with each scorer
of its detector: the calibrated ``ref-outlier`` (against the scan's reference
cell) and the detector's own (the paper's), with their default configs or those
given by ``--scorer-option``.  A scan the model made unscannable (non-finite
outputs, collapsed class scores on the pool) counts as a detection for every
scorer.  Scans are grouped by detector setting and scorer (detector, its
config, pool, scorer, its config): one group per (detector, scorer) in a plain
sweep, more per ablation value.  For each group: the verdict an auditor gets
(AUROC over all models and over those whose backdoor implanted, the
false-positive rate on clean models with its Clopper-Pearson interval, TPR and
target accuracy on implanted ones); model-level detection (AUROC of s_max with the ROC curve, accuracy
and TPR/FPR at the scorer's own threshold k, the Youden-J threshold; Figure 4),
class-level TP/FP/FN/F1 per dataset and per attack (Tables 2-3), the anomaly
score per attack (Figure 5), the reconstructed triggers' ASR on the backdoor
class and on the others (Tables 4, 15-17) and their SSIM (Table 24), and the
wall time.  Per attack: ACC and ASR on seen (base) and unseen (new) classes
(Tables 7-10).  Per repairer, attack and dataset: ACC and ASR before and after
the repair (Tables 19-23).  Definitions are in ``ci_core.harness.statistics`` and in
the report.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ci_core.harness.cells import SCAN, read_reference, stored_evidence
from ci_core.harness.statistics import (Counts, auroc, class_counts, clopper_pearson, confusion, has_both_classes, roc_curve,
                                   youden_threshold)
from ci_core.harness.plan import CLEAN_ATTACK, variant_label
from ci_core.harness.store import Store, read_json, spec_hash
from ci_core.errors import ConfigError
from ci_core.files import publishing
from ci_core.interfaces import to_json
from ci_core.plugins import registry
from ci_core.scan import UNSCANNABLE, PoolHealth, apply_scorer
from ci_core.protocol import REFERENCE_SCORER

REPORT_FILES = ("report.md", "report.json")
REPORT_OUTPUT = "bench-report"  # the kind of output folder the report writes (ci_core.files.publishing)
GROUP_FIELDS = ("detector", "detector_config", "pool", "scorer", "scorer_config")
IMPLANTED = 0.5  # ASR on unseen classes from which a backdoor counts as implanted in the verdict table

DEFINITIONS = {
    "verdict": (
        "What an auditor gets from each scorer at its default threshold. Negatives are the clean models (the clean "
        "attack and every attack's control, trained on the attack's schedule with its backdoor off); positives the "
        "backdoored models whose attack implanted (ASR on unseen classes at least 0.5); models of attacks that did "
        "not implant are left out. A scan the model made unscannable counts as flagged (fail closed). FPR: share of "
        "clean models flagged, with its exact (Clopper-Pearson) 95% interval. TPR: share of implanted models flagged; "
        "target: share of them whose most anomalous class is the true target. AUROC (all): over every model, "
        "attacks that did not implant included as positives; AUROC (implanted): over clean and implanted ones; "
        "both by s_max, unscannable models ranked highest."),
    "model_level": (
        "Every scanned model is one item, positive iff an attack other than 'clean' implanted a backdoor; its score "
        "is the scan's s_max. AUROC is over s_max (ties count 1/2). Accuracy, TPR and FPR are those of the scan's own "
        "verdict (s_max >= k, the scorer's threshold). The Youden-J threshold tau maximises TPR - FPR over the ROC "
        "thresholds (a model is flagged iff s_max >= tau; the highest such tau on ties)."),
    "implanted": (
        "The same, counting as backdoored only the models whose attack implanted: ASR on unseen classes (new "
        "classes plus the target, the attack's own trigger) at least the level shown; clean models as above. An "
        "attack that did not implant leaves nothing to find. Top = target: the share of these backdoored models "
        "whose most anomalous class is the target."),
    "class_level": (
        "Every candidate class of every scanned model is one item, positive iff it is that model's backdoor target, "
        "predicted positive iff the scorer flagged it (its own score >= k). So a backdoored model whose target is "
        "flagged adds one TP, one whose target is not flagged adds one FN, and every flagged class that is not the "
        "model's target (in clean and backdoored models alike) adds one FP. F1 = 2TP / (2TP + FP + FN); n/a when "
        "there is no positive item and nothing flagged. The 'all' row sums the counts (micro F1)."),
    "attack": (
        "ACC is clean accuracy on the test images of the base (seen) and new (unseen) classes. ASR is the share of "
        "triggered test images not of the target class classified as the target: seen = base classes, unseen = new "
        "classes plus the target. Trigger SSIM is the mean SSIM between clean and triggered test images."),
    "reconstruction": (
        "Target ASR: the ASR on the held-out OOD images of the trigger the detector reconstructed for the true "
        "target class (backdoored models). Other-class ASR: per model, the mean ASR of the triggers reconstructed "
        "for every other class; then averaged over models. SSIM: mean SSIM between held-out images and the same "
        "images with the reconstructed trigger, for the target class (backdoored models) and over all classes."),
    "anomaly": "Mean (and standard deviation over models) of s_max per attack; 'flagged' is the share of models "
               "with s_max >= k.",
    "repair": (
        "Each backdoored model (every attack but 'clean') is fine-tuned by each repairer on a labelled clean subset "
        "of its own few-shot training set, stamped with the trigger the repairer takes from the model's ci scan. "
        "ACC seen / unseen is clean accuracy on the test images of the base / new classes. "
        "ASR seen / unseen is the share of test images not of the target class, stamped with the attack's own "
        "(ground-truth) trigger, that are classified as the target, on the base classes / on the new classes plus "
        "the target. "
        "'before' is the model's own evaluation when it was trained and 'after' that of the repaired model, by the "
        "same code on the same test images. "
        "ĉ = target is the share of models whose ci scan ranked the true target most anomalous (ci-trigger stamps "
        "ĉ's trigger). "
        "Repair s is the wall time of the fine-tuning alone. "
        "The 'all' rows pool every model the repairer repaired (the paper's Table 19 averages over attacks)."),
    "statistics": "mean ± sample standard deviation over models (n = number of models); n/a when there is none. "
                  "Times: 's' is wall time; 'CPU s' the CPU time of the process running the cell (all its threads).",
}


# --------------------------------------------------------------------------- loading


def _scorer_configs(options: dict[str, dict] | None) -> dict[str, Any]:
    """Scorer name -> instance with its default config, overridden by ``options`` (checked by name)."""
    plugins = registry()
    options = dict(options or {})
    for name in options:
        plugins.get("scorer", name)  # an unknown scorer fails here, naming the registered ones
    return {name: plugins.get("scorer", name).from_options(options.get(name)) for name in plugins.names("scorer")}


def _scan_rows(store: Store, scorer_options: dict[str, dict] | None = None) -> tuple[list[dict], list[dict]]:
    """(model cells, one row per scan and scorer): each scan's stored evidence scored again by every scorer that
    applies to it (its detector's own, and the calibrated one where the scan has a reference)."""
    models = {cell["key"]: cell for cell in store.cells("model")}
    references = {cell["key"]: None for cell in store.cells("reference")}
    scorers = _scorer_configs(scorer_options)
    plugins = registry()
    rows = []
    for cell in store.cells("scan"):
        model = models.get(cell["model"])
        if model is None:
            raise ConfigError(f"{store.cell_dir('scan', cell['key'])}: its model cell {cell['model']} is not in the store")
        report_path = store.cell_dir("scan", cell["key"]) / SCAN / "report.json"
        report = read_json(report_path, "scan report")
        evidence = stored_evidence(report_path)
        reference = None
        if cell.get("reference"):
            key = cell["reference"]
            if key not in references:
                raise ConfigError(f"{store.cell_dir('scan', cell['key'])}: its reference cell {key} is not in the store")
            if references[key] is None:
                references[key] = read_reference(store, key)
            reference = references[key]
        health = report.get("pool_health") or {}
        problems = list(report.get("unscannable_reasons") or [])
        if not problems and reference is not None and health:
            problems = list(PoolHealth(**health).problems(reference.health))
        own = plugins.get("detector", cell["detector"]).default_scorer
        for name in ([REFERENCE_SCORER] if reference is not None else []) + [own]:
            scorer = scorers[name]
            row = {**cell, "classes": report["classes"], "model_cell": model, "scorer": name,
                   "scorer_config": to_json(scorer.config), "problems": problems}
            if problems:
                row.update(verdict=UNSCANNABLE, backdoored=True, s_max=math.inf, p_value=None,
                           predicted_target=None, flagged=[], rule=None)
            else:
                scores = apply_scorer(scorer, evidence, reference.classes if reference is not None else None).scores
                row.update(verdict="backdoored" if scores.backdoored else "clean", backdoored=scores.backdoored,
                           s_max=scores.s_max, p_value=scores.p_value, predicted_target=scores.target,
                           flagged=list(scores.flagged), rule=scores.rule, scores=list(scores.scores))
            rows.append(row)
    return list(models.values()), rows


def _pending(store: Store, failed_keys: set[str]) -> list[dict]:
    seen, pending = set(), []
    for plan in store.plans():
        for cell in plan.get("cells", []):
            key = cell["key"]
            if key in seen:
                continue
            seen.add(key)
            if not store.is_done(cell["kind"], key) and key not in failed_keys:
                pending.append(cell)
    return pending


# --------------------------------------------------------------------------- statistics


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def mean_std(values: Iterable[float | None]) -> dict:
    x = [v for v in values if v is not None]
    if not x:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)) if len(x) > 1 else None, "n": len(x)}


def _attack_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    return ([CLEAN_ATTACK] if CLEAN_ATTACK in names else []) + sorted(names - {CLEAN_ATTACK})


def _by(rows: Sequence[dict], field: str, order: Callable[[Iterable[str]], list[str]] = sorted) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for row in rows:
        grouped[row[field]].append(row)
    return {name: grouped[name] for name in order(grouped)}


def _group_key(row: dict) -> str:
    spec = row["spec"]
    return spec_hash({"detector": spec["detector"], "detector_config": spec["detector_config"], "pool": spec["pool"],
                      "scorer": row["scorer"], "scorer_config": row["scorer_config"]})


def scan_class_counts(row: dict) -> Counts:
    return class_counts([c["name"] for c in row["classes"]], row["flagged"], row["true_target"])


def _counts_row(name: str, rows: Sequence[dict]) -> dict:
    counts = sum((scan_class_counts(row) for row in rows), Counts())
    return {"name": name, "models": len(rows), "classes": counts.total, "tp": counts.tp, "fp": counts.fp,
            "fn": counts.fn, "f1": counts.f1}


def _group_label(groups: dict[str, list[dict]]) -> dict[str, str]:
    """Each group's display name: detector / scorer, plus its ablation values when it has several settings."""
    per_detector = defaultdict(list)
    for gid, rows in groups.items():
        per_detector[(rows[0]["detector"], rows[0]["scorer"])].append(gid)
    labels = {}
    for (detector, scorer), gids in per_detector.items():
        for gid in gids:
            shown = f"{detector} / {scorer}"
            labels[gid] = shown if len(gids) == 1 else f"{shown} [{variant_label(groups[gid][0]['variant'])}]"
    counts = defaultdict(int)
    for label in labels.values():
        counts[label] += 1
    return {gid: (f"{label} #{gid[:6]}" if counts[label] > 1 else label) for gid, label in labels.items()}


def _group_order(row: dict) -> tuple:
    v = row["variant"]
    return (row["detector"], v["pool_size"], v["holdout"], v.get("batch_size") or 0, str(v.get("loss") or ""),
            v["inversion_data"], spec_hash(row["spec"]["detector_config"]), row["scorer"] != REFERENCE_SCORER,
            row["scorer"])


def _implanted(row: dict, level: float) -> bool:
    return row["true_target"] is not None and (row["model_cell"]["metrics"].get("asr_new") or 0.0) >= level


def verdict_summary(rows: Sequence[dict]) -> dict:
    """The auditor's figures of one scorer (see DEFINITIONS["verdict"])."""
    clean = [row for row in rows if row["true_target"] is None]
    implanted = [row for row in rows if _implanted(row, IMPLANTED)]
    flagged_clean = sum(row["backdoored"] for row in clean)
    summary: dict[str, Any] = {
        "clean": len(clean), "implanted": len(implanted), "backdoored": sum(r["true_target"] is not None for r in rows),
        "false_positives": flagged_clean, "fpr": flagged_clean / len(clean) if clean else None,
        "fpr_ci95": list(clopper_pearson(flagged_clean, len(clean))) if clean else None,
        "tpr": sum(r["backdoored"] for r in implanted) / len(implanted) if implanted else None,
        "target_accuracy": (sum(r["predicted_target"] == r["true_target"] for r in implanted) / len(implanted)
                            if implanted else None),
        "unscannable": sum(r["verdict"] == UNSCANNABLE for r in rows),
        "rule": next((r["rule"] for r in rows if r.get("rule")), None),
    }
    for name, part in (("auroc_all", rows), ("auroc_implanted", clean + implanted)):
        truth = [row["true_target"] is not None for row in part]
        summary[name] = auroc(truth, [row["s_max"] for row in part]) if has_both_classes(truth) else None
    return summary


IMPLANT_LEVELS = (0.5, 0.8)  # ASR on unseen classes from which a backdoor counts as implanted


def implanted_model_level(rows: Sequence[dict], level: float) -> dict:
    """Model-level figures over the clean models and the backdoored ones whose unseen-class ASR reached ``level``."""
    kept = [row for row in rows if row["true_target"] is None
            or (row["model_cell"]["metrics"].get("asr_new") or 0.0) >= level]
    truth = [row["true_target"] is not None for row in kept]
    backdoored = [row for row in kept if row["true_target"] is not None]
    verdict = confusion(truth, [row["backdoored"] for row in kept])
    return {"min_asr_unseen": level, "backdoored": len(backdoored), "clean": len(kept) - len(backdoored),
            "auroc": auroc(truth, [row["s_max"] for row in kept]) if has_both_classes(truth) else None,
            "tpr": verdict.tpr if backdoored else None,
            "top_is_target": (sum(row["predicted_target"] == row["true_target"] for row in backdoored)
                              / len(backdoored)) if backdoored else None}


def _group_summary(label: str, rows: list[dict]) -> dict:
    first = rows[0]
    truth = [row["true_target"] is not None for row in rows]
    s_max = [row["s_max"] for row in rows]
    verdict = confusion(truth, [row["backdoored"] for row in rows])
    model_level: dict[str, Any] = {
        "models": len(rows), "backdoored": sum(truth), "clean": len(rows) - sum(truth),
        "rule": next((r["rule"] for r in rows if r.get("rule")), None),
        "k": first["scorer_config"].get("k"), "accuracy": verdict.accuracy, "tpr": verdict.tpr, "fpr": verdict.fpr,
        "tp": verdict.tp, "fp": verdict.fp, "fn": verdict.fn, "tn": verdict.tn,
        "auroc": None, "youden": None, "roc": None,
    }
    if has_both_classes(truth):
        roc = roc_curve(truth, s_max)
        best = youden_threshold(truth, s_max)
        model_level.update(auroc=auroc(truth, s_max),
                           # +inf: no finite threshold does better than flagging nothing
                           youden={"threshold": best.threshold if math.isfinite(best.threshold) else "+inf",
                                   "j": best.j, "tpr": best.tpr, "fpr": best.fpr},
                           roc={"thresholds": [_finite(t) for t in roc.thresholds], "fpr": list(roc.fpr),
                                "tpr": list(roc.tpr)})

    model_level["implanted"] = [implanted_model_level(rows, level) for level in IMPLANT_LEVELS]

    class_level = {
        by: [_counts_row(name, part) for name, part in _by(rows, by, order).items()] + [_counts_row("all", rows)]
        for by, order in (("dataset", sorted), ("attack", _attack_order))
    }

    anomaly = [{"attack": name, "models": len(part), "s_max": mean_std(r["s_max"] for r in part),
                "flagged": sum(r["backdoored"] for r in part) / len(part)}
               for name, part in _by(rows, "attack", _attack_order).items()]

    target_asr, other_asr, target_ssim, all_ssim, per_class_seconds = [], [], [], [], []
    for row in rows:
        by_name = {c["name"]: c for c in row["classes"]}
        target = row["true_target"]
        if target is not None:
            target_asr.append(by_name[target]["asr"])
            target_ssim.append(by_name[target]["ssim"])
        others = [c["asr"] for c in row["classes"] if c["name"] != target]
        other_asr.append(float(np.mean(others)) if others else None)
        all_ssim.append(float(np.mean([c["ssim"] for c in row["classes"]])))
        per_class_seconds.append(float(np.mean([c["seconds"] for c in row["classes"]])))
    return {
        "label": label, "detector": first["detector"], "scorer": first["scorer"], "variant": first["variant"],
        "detector_config": first["spec"]["detector_config"], "scorer_config": first["scorer_config"],
        "pool": first["spec"]["pool"], "verdict": verdict_summary(rows),
        "model_level": model_level, "class_level": class_level, "anomaly_by_attack": anomaly,
        "reconstruction": {"target_asr": mean_std(target_asr), "other_asr": mean_std(other_asr),
                           "target_ssim": mean_std(target_ssim), "all_ssim": mean_std(all_ssim)},
        "cost": {"seconds_per_scan": mean_std(r["scan_seconds"] for r in rows),
                 "seconds_per_class": mean_std(per_class_seconds),
                 "cpu_seconds_per_scan": mean_std(r.get("cpu_seconds") for r in rows)},
    }


def _attack_rows(models: Sequence[dict]) -> list[dict]:
    models = [{**m, "attack": f"{m['attack']} (control)" if m.get("control") else m["attack"]} for m in models]
    rows = []
    for attack, part in _by(models, "attack", _attack_order).items():
        per_dataset = list(_by(part, "dataset").items())
        for dataset, cells in per_dataset + ([("all", part)] if len(per_dataset) > 1 else []):
            metric = lambda name: mean_std(c["metrics"][name] for c in cells)  # noqa: E731
            rows.append({"attack": attack, "dataset": dataset, "models": len(cells),
                         "acc_seen": metric("acc_base"), "acc_unseen": metric("acc_new"),
                         "asr_seen": metric("asr_base"), "asr_unseen": metric("asr_new"),
                         "trigger_ssim": metric("trigger_ssim"),
                         "train_seconds": mean_std(c["seconds"] for c in cells),
                         "train_cpu_seconds": mean_std(c.get("cpu_seconds") for c in cells)})
    return rows


REPAIR_METRICS = (("acc_seen", "acc_base"), ("acc_unseen", "acc_new"), ("asr_seen", "asr_base"),
                  ("asr_unseen", "asr_new"))


def _repair_row(repairer: str, attack: str, dataset: str, cells: Sequence[dict]) -> dict:
    row: dict[str, Any] = {"repairer": repairer, "attack": attack, "dataset": dataset, "models": len(cells)}
    for name, field in REPAIR_METRICS:
        for when in ("before", "after"):
            row[f"{name}_{when}"] = mean_std(c[when][field] for c in cells)
    row["scan_hit"] = sum(c["scan_target"] == c["true_target"] for c in cells) / len(cells)
    row["repair_seconds"] = mean_std(c["repair_seconds"] for c in cells)
    row["repair_cpu_seconds"] = mean_std(c.get("repair_cpu_seconds") for c in cells)
    return row


def _repair_rows(repairs: Sequence[dict]) -> list[dict]:
    """Per repairer: one row per attack and dataset (and per attack over datasets), then one over every attack."""
    rows = []
    for repairer, by_repairer in _by(repairs, "repairer").items():
        per_attack = list(_by(by_repairer, "attack", _attack_order).items())
        for attack, part in per_attack:
            per_dataset = list(_by(part, "dataset").items())
            for dataset, cells in per_dataset + ([("all", part)] if len(per_dataset) > 1 else []):
                rows.append(_repair_row(repairer, attack, dataset, cells))
        if len(per_attack) > 1:
            rows.append(_repair_row(repairer, "all", "all", by_repairer))
    return rows


def _skipped_repairs(store: Store) -> list[dict]:
    """The repairs the sweeps' plans left out, and why, merged over plans."""
    merged: dict[tuple[str, str], list[str]] = {}
    for plan in store.plans():
        for skipped in plan.get("skipped_repairs", []):
            names = merged.setdefault((skipped["attack"], skipped["reason"]), [])
            names.extend(n for n in skipped["repairers"] if n not in names)
    order = sorted(merged, key=lambda item: (item[0] != CLEAN_ATTACK, item))  # clean first, as in the tables
    return [{"attack": attack, "repairers": merged[(attack, reason)], "reason": reason} for attack, reason in order]


def build_report(store: Store, scorer_options: dict[str, dict] | None = None) -> dict:
    """Every table of the report as plain JSON; ``scorer_options`` override scorer configs by name."""
    models, rows = _scan_rows(store, scorer_options)
    repairs = store.cells("repair")
    failures = store.failures()
    broken = store.broken()
    if not models and not failures:
        raise ConfigError(f"{store.root} holds no finished or failed cell yet; run `ci-bench run --out {store.root}`")
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    groups = dict(sorted(groups.items(), key=lambda item: _group_order(item[1][0])))
    labels = _group_label(groups)
    return {
        "store": str(store.root),
        "definitions": DEFINITIONS,
        "counts": {"models": len(models), "clean_models": sum(m["target"] is None for m in models),
                   "scans": len({row["key"] for row in rows}), "repairs": len(repairs), "failed": len(failures),
                   "broken": len(broken)},
        "broken": broken,
        "detectors": [_group_summary(labels[gid], part) for gid, part in groups.items()],
        "attacks": _attack_rows(models),
        "repairs": _repair_rows(repairs),
        "skipped_repairs": _skipped_repairs(store),
        "failures": [{"kind": f.get("kind"), "label": f.get("label"), "key": f.get("key"), "error": f.get("error")}
                     for f in failures],
        "pending": _pending(store, {f.get("key") for f in failures}),
    }


# --------------------------------------------------------------------------- Markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict) and "mean" in value:
        if value["mean"] is None:
            return "n/a"
        return _fmt(value["mean"]) + (f" ± {value['std']:.3f}" if value["std"] is not None else "")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def md_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)).replace("|", "\\|") for key, _ in columns) + " |")
    return "\n".join(lines)


COUNT_COLUMNS = [("models", "models"), ("classes", "classes"), ("tp", "TP"), ("fp", "FP"), ("fn", "FN"), ("f1", "F1")]


def to_markdown(report: dict, figures: Sequence[str] = ()) -> str:
    counts = report["counts"]
    repairs = f"{counts['repairs']} repairs, " if counts["repairs"] or report["skipped_repairs"] else ""
    out = [f"# ci-bench report: {report['store']}", "",
           f"{counts['models']} models, {counts['scans']} scans, {repairs}{counts['failed']} failed cells, "
           f"{len(report['pending'])} planned cells not run yet.", ""]
    groups = report["detectors"]

    out += ["## Verdicts", "", DEFINITIONS["verdict"], ""]
    rows = []
    for g in groups:
        v = g["verdict"]
        interval = v["fpr_ci95"]
        rows.append({"label": g["label"], "rule": v["rule"], "models": f"{v['implanted']} + {v['clean']}",
                     "auroc_all": v["auroc_all"], "auroc_implanted": v["auroc_implanted"],
                     "fpr": (f"{v['fpr']:.3f} ({v['false_positives']}/{v['clean']}; "
                             f"95% CI {interval[0]:.3f}-{interval[1]:.3f})") if interval else None,
                     "tpr": v["tpr"], "target": v["target_accuracy"], "unscannable": v["unscannable"]})
    out += [md_table(rows, [("label", "detector / scorer"), ("rule", "flags when"),
                            ("models", "implanted + clean"), ("auroc_all", "AUROC (all)"),
                            ("auroc_implanted", "AUROC (implanted)"), ("fpr", "FPR on clean"), ("tpr", "TPR"),
                            ("target", "target named"), ("unscannable", "unscannable")]), ""]

    out += ["## Model-level detection (Figure 4)", "", DEFINITIONS["model_level"], ""]
    rows = []
    for g in groups:
        m = g["model_level"]
        youden = m["youden"] or {}
        rows.append({"label": g["label"], "models": f"{m['backdoored']} + {m['clean']}", "auroc": m["auroc"],
                     "k": m["rule"], "accuracy": m["accuracy"], "tpr": m["tpr"], "fpr": m["fpr"],
                     "tau": youden.get("threshold"), "j": youden.get("j"), "tpr_tau": youden.get("tpr"),
                     "fpr_tau": youden.get("fpr")})
    out += [md_table(rows, [("label", "detector"), ("models", "backdoored + clean"), ("auroc", "AUROC"), ("k", "verdict"),
                            ("accuracy", "ACC"), ("tpr", "TPR"), ("fpr", "FPR"), ("tau", "Youden τ"),
                            ("j", "J"), ("tpr_tau", "TPR@τ"), ("fpr_tau", "FPR@τ")]), ""]
    if "roc.png" in figures:
        out += ["![ROC curves of s_max](roc.png)", ""]
    out += ["### Over backdoors that implanted", "", DEFINITIONS["implanted"], ""]
    rows = [{"label": g["label"], **row, "models": f"{row['backdoored']} + {row['clean']}"}
            for g in groups for row in g["model_level"]["implanted"]]
    out += [md_table(rows, [("label", "detector"), ("min_asr_unseen", "ASR unseen ≥"),
                            ("models", "backdoored + clean"), ("auroc", "AUROC"), ("tpr", "TPR@k"),
                            ("top_is_target", "top = target")]), ""]

    out += ["## Class-level target detection (Tables 2-3)", "", DEFINITIONS["class_level"], ""]
    for by in ("dataset", "attack"):
        rows = [{"label": g["label"], **row} for g in groups for row in g["class_level"][by]]
        out += [f"### Per {by}", "", md_table(rows, [("label", "detector"), ("name", by)] + COUNT_COLUMNS), ""]

    out += ["## Anomaly score per attack (Figure 5)", "", DEFINITIONS["anomaly"], ""]
    rows = [{"label": g["label"], **a} for g in groups for a in g["anomaly_by_attack"]]
    out += [md_table(rows, [("label", "detector"), ("attack", "attack"), ("models", "models"), ("s_max", "s_max"),
                            ("flagged", "flagged")]), ""]
    if "anomaly_scores.png" in figures:
        out += ["![Mean s_max per attack and detector](anomaly_scores.png)", ""]

    out += ["## Reconstructed triggers and cost (Tables 4, 15-17, 24)", "", DEFINITIONS["reconstruction"], ""]
    rows = [{"label": g["label"], "variant": variant_label(g["variant"]), **g["reconstruction"], **g["cost"]}
            for g in groups]
    out += [md_table(rows, [("label", "detector"), ("variant", "setting"), ("target_asr", "target ASR"),
                            ("other_asr", "other-class ASR"), ("target_ssim", "SSIM target"),
                            ("all_ssim", "SSIM all classes"), ("seconds_per_scan", "s / scan"),
                            ("seconds_per_class", "s / class"), ("cpu_seconds_per_scan", "CPU s / scan")]), ""]

    out += ["## Attacks: ACC and ASR on seen and unseen classes (Tables 7-10)", "", DEFINITIONS["attack"], "",
            md_table(report["attacks"], [("attack", "attack"), ("dataset", "dataset"), ("models", "models"),
                                         ("acc_seen", "ACC seen"), ("asr_seen", "ASR seen"),
                                         ("acc_unseen", "ACC unseen"), ("asr_unseen", "ASR unseen"),
                                         ("trigger_ssim", "trigger SSIM"), ("train_seconds", "train s"),
                                         ("train_cpu_seconds", "train CPU s")]), ""]

    if report["repairs"] or report["skipped_repairs"]:
        out += ["## Repair (Table 19)", "", DEFINITIONS["repair"], ""]
        columns = [("repairer", "repairer"), ("attack", "attack"), ("dataset", "dataset"), ("models", "models")]
        for name, header in (("acc_seen", "ACC seen"), ("acc_unseen", "ACC unseen"), ("asr_seen", "ASR seen"),
                             ("asr_unseen", "ASR unseen")):
            columns += [(f"{name}_before", f"{header} before"), (f"{name}_after", f"{header} after")]
        columns += [("scan_hit", "ĉ = target"), ("repair_seconds", "repair s")]
        out += [md_table(report["repairs"], columns) if report["repairs"] else "No repair has finished yet.", ""]
        if report["skipped_repairs"]:
            out += ["Not repaired (by plan, not failures):", ""]
            out += [f"- {s['attack']} ({', '.join(s['repairers'])}): {s['reason']}" for s in report["skipped_repairs"]]
            out += [""]

    if report["broken"]:
        out += ["## Cells whose files do not check out (left out; the next run moves them aside and redoes them)", "",
                md_table(report["broken"], [("kind", "kind"), ("key", "cell"), ("problem", "problem")]), ""]
    out += ["## Failed cells", ""]
    out += [md_table(report["failures"], [("kind", "kind"), ("label", "cell"), ("error", "error")])
            if report["failures"] else "None.", ""]
    if report["pending"]:
        out += ["## Planned cells without a result", "",
                md_table(report["pending"], [("kind", "kind"), ("label", "cell"), ("key", "key")]), ""]
    out += [f"Statistics: {DEFINITIONS['statistics']}", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, without pyplot's global state
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_roc(report: dict, path: Path) -> bool:
    groups = [g for g in report["detectors"] if g["model_level"]["roc"] is not None]
    if not groups:
        return False
    figure = _new_figure(5, 5)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for g in groups:
        roc = g["model_level"]["roc"]
        ax.plot(roc["fpr"], roc["tpr"], marker=".", label=f"{g['label']} (AUROC {g['model_level']['auroc']:.3f})")
    ax.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title="ROC of s_max (model level)")
    ax.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=120)
    return True


def plot_anomaly_scores(report: dict, path: Path) -> bool:
    groups = [g for g in report["detectors"] if g["anomaly_by_attack"]]
    if not groups:
        return False
    figure = _new_figure(max(4.0, 3.2 * len(groups)), 3.6)
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for ax, g in zip(axes, groups):
        attacks = g["anomaly_by_attack"]
        names = [a["attack"] for a in attacks]
        means = [a["s_max"]["mean"] for a in attacks]
        errors = [a["s_max"]["std"] or 0.0 for a in attacks]
        colours = ["tab:green" if name == CLEAN_ATTACK else "tab:red" for name in names]
        ax.bar(range(len(names)), means, yerr=errors, color=colours, capsize=3)
        if g["model_level"]["k"] is not None:
            ax.axhline(g["model_level"]["k"], linestyle="--", color="black", linewidth=1, label=f"k = {g['model_level']['k']:g}")
            ax.legend(fontsize="small")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set(title=g["label"], ylabel="mean s_max")
    figure.savefig(path, dpi=120)
    return True


# --------------------------------------------------------------------------- writing


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_report(store: Store, out: Path | None = None,
                 scorer_options: dict[str, dict] | None = None) -> tuple[Path, str]:
    """Write report.md, report.json and the PNG figures to ``out`` (default STORE/report) atomically."""
    out = Path(out) if out is not None else store.root / "report"
    report = build_report(store, scorer_options)
    with publishing(out, REPORT_OUTPUT) as work:
        figures = [name for name, plot in (("roc.png", plot_roc), ("anomaly_scores.png", plot_anomaly_scores))
                   if plot(report, work / name)]
        markdown = to_markdown(report, figures)
        (work / "report.md").write_text(markdown)
        (work / "report.json").write_text(json.dumps(_json_ready({**report, "figures": figures}), indent=2,
                                                     allow_nan=False) + "\n")
    return out, markdown
