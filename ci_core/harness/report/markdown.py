"""The report's tables as Markdown."""

from __future__ import annotations

from typing import Any, Sequence

from ci_core.harness.plan import variant_label
from ci_core.harness.report.tables import DEFINITIONS
from ci_core.learning.protocol import REFERENCE_SCORER


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
    lines = ["| " + " | ".join(header.replace("|", "\\|") for _, header in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)).replace("|", "\\|") for key, _ in columns) + " |")
    return "\n".join(lines)


def _fraction(share: float | None, count: int, total: int) -> str | None:
    return None if share is None else f"{share:.2f} ({count}/{total})"


def _p(value: float | None) -> str | None:
    if value is None:
        return None
    return f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


COUNT_COLUMNS = [("models", "models"), ("classes", "classes"), ("tp", "TP"), ("fp", "FP"), ("fn", "FN"), ("f1", "F1")]


def repair_section(report: dict) -> list[str]:
    """The repair tables (Table 19, then the working backdoors against the aim and the controls); none without repairs."""
    if not (report["repairs"] or report["skipped_repairs"]):
        return []
    out: list[str] = []
    out += ["## Repair (Table 19)", "", DEFINITIONS["repair"], ""]
    columns = [("repairer", "repairer"), ("attack", "attack"), ("dataset", "dataset"), ("models", "models")]
    for name, header in (("acc_seen", "ACC seen"), ("acc_unseen", "ACC unseen"), ("asr_seen", "ASR seen"),
                         ("asr_unseen", "ASR unseen")):
        columns += [(f"{name}_before", f"{header} before"), (f"{name}_after", f"{header} after")]
    columns += [("scan_hit", "ĉ = target"), ("repair_seconds", "repair s")]
    out += [md_table(report["repairs"], columns) if report["repairs"] else "No repair has finished yet.", ""]
    check = report.get("repair_check") or {}
    if check.get("models"):
        out += ["### Working backdoors: the aim and the controls", "", DEFINITIONS["repair_check"], "",
                md_table(check["attacks"], [("repairer", "repairer"), ("attack", "attack"), ("models", "models"),
                                            ("removed", "removed"), ("beats_controls", "beats every control"),
                                            ("at_floor", "at the floor"),
                                            ("asr_seen_after", "ASR seen after"),
                                            ("asr_unseen_after", "ASR unseen after"),
                                            ("acc_seen_change", "ACC seen change")]), ""]
        controls = sorted({k for row in check["models"] for k in row if k.startswith("left_by_")})
        out += [md_table(check["models"], [("repairer", "repairer"), ("attack", "attack"), ("dataset", "dataset"),
                                           ("seed", "seed"), ("asr_seen_before", "ASR seen before"),
                                           ("asr_seen_after", "after"), ("asr_unseen_before", "ASR unseen before"),
                                           ("asr_unseen_after", "after"), ("acc_seen_change", "ACC seen change"),
                                           ("removed", "removed")]
                        + [(k, f"left by {k[len('left_by_'):]}") for k in controls]
                        + [("beats_controls", "beats every control"), ("floor_seen", "floor seen"),
                           ("floor_unseen", "floor unseen"), ("at_floor", "at the floor"),
                           ("scan_hit", "ĉ = target")]), ""]
    if report["skipped_repairs"]:
        out += ["Not repaired (left out by the plan, or no trigger to repair with; not failures):", ""]
        out += [f"- {s['attack']} ({', '.join(s['repairers'])}): {s['reason']}" for s in report["skipped_repairs"]]
        out += [""]
    return out


def to_markdown(report: dict, figures: Sequence[str] = ()) -> str:
    counts = report["counts"]
    repairs = f"{counts['repairs']} repairs, " if counts["repairs"] or report["skipped_repairs"] else ""
    out = [f"# ci-bench report: {report['store']}", "",
           f"{counts['models']} models, {counts['scans']} scans, {repairs}{counts['failed']} failed cells, "
           f"{len(report['pending'])} planned cells not run yet.", ""]
    prior = report.get("variance_prior")
    if prior:
        out += [f"The calibrated scorer ({REFERENCE_SCORER}) reads every scan with the variance prior of its setting "
                f"from {prior['book']} ({prior['settings']} settings; docs/verdicts.md, \"A sixth freeze\").", ""]
    groups = report["detectors"]

    out += ["## Verdicts", "", DEFINITIONS["verdict"], ""]
    rows = []
    for g in groups:
        v = g["verdict"]
        interval = v["fpr_ci95"]
        row = {"label": g["label"], "rule": v["rule"],
               "fpr": (f"{v['fpr']:.3f} ({v['false_positives']}/{v['clean']}; "
                       f"95% CI {interval[0]:.3f}-{interval[1]:.3f})") if interval else None,
               "auroc_works": v["auroc_works"], "auroc_implanted": v["auroc_implanted"], "auroc_all": v["auroc_all"],
               "unscannable": v["unscannable"]}
        for name, figures in v["populations"].items():
            row[f"tpr_{name}"] = _fraction(figures["tpr"], figures["flagged"], figures["models"])
            row[f"target_{name}"] = _fraction(figures["target_accuracy"], figures["target_named"], figures["models"])
        rows.append(row)
    out += [md_table(rows, [("label", "detector / scorer"), ("rule", "flags when"), ("fpr", "FPR on clean"),
                            ("tpr_works", "TPR works"), ("target_works", "target named, works"),
                            ("tpr_unseen", "TPR unseen"), ("tpr_seen_only", "TPR seen only"), ("tpr_all", "TPR all"),
                            ("target_unseen", "target named, unseen"), ("auroc_works", "AUROC (works)"),
                            ("auroc_implanted", "AUROC (implanted)"), ("auroc_all", "AUROC (all)"),
                            ("unscannable", "unscannable")]), ""]
    if report.get("models"):
        scorer_labels = [g["label"] for g in groups]
        out += ["### Per model", "", DEFINITIONS["models"], ""]
        rows, columns = [], [("attack", "attack"), ("dataset", "dataset"), ("seed", "seed"), ("asr_seen", "ASR seen"),
                             ("asr_unseen", "ASR unseen"), ("population", "population"), ("true_target", "target")]
        for i, label in enumerate(scorer_labels):
            columns += [(f"v{i}", f"{label}: verdict"), (f"p{i}", "p"), (f"t{i}", "top")]
        for model in report["models"]:
            row = {k: model[k] for k, _ in columns[:7]}
            for i, label in enumerate(scorer_labels):
                got = model["scorers"].get(label)
                if got:
                    row.update({f"v{i}": got["verdict"], f"p{i}": _p(got["p_value"]), f"t{i}": got["top"]})
            rows.append(row)
        out += [md_table(rows, columns), ""]

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
    rows = [{"label": g["label"], "variant": variant_label(g["variant"]) if isinstance(g["variant"], dict)
             else g["variant"], **g["reconstruction"], **g["cost"]}
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

    out += repair_section(report)

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
