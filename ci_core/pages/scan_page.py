"""A scan's ``report.html``: the verdict first, then the evidence behind it, then what was run.

The page is made from the typed ``ScanReport`` alone (and the trigger strips of
its folder), so it shows exactly what ``report.json`` holds.  Its parts:
the verdict with its p-value, rule and target and a sentence saying what it
means; the evidence figure (with a reference: each class's cost in the model
against the backbone's, the least-squares line ``ref-outlier`` tests against,
the most anomalous class marked; without: the deciding scorer's per-class
scores and threshold); the per-class table ordered by anomaly; the top
classes' trigger strips and inversion loss traces; pool health; provenance and
the command that reproduces the scan.  An unscannable scan shows its reasons,
pool health and provenance, and no table or figure that could be read as a
result.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ci_core.pages import file_data_uri, format_number, new_figure, plain_label, png_data_uri, render
from ci_core.scanning.inversion import MIN_SPREAD_RATIO
from ci_core.scanning.scan import BACKDOORED, CLEAN, UNSCANNABLE
from ci_core.scanning.seen import line_design, seen_column

if TYPE_CHECKING:
    from ci_core.scanning.scan_report import ScanReport

PAGE_FILE = "report.html"
TOP_CLASSES = 5  # trigger strips and loss traces shown for this many of the most anomalous classes
# What each known scorer's per-class score is, for the table's header; another scorer's is "score (name)".
SCORE_NAMES = {"ref-outlier": "residual t", "ci": "anomaly score S", "mad": "anomaly index"}
FIGURE_NAMES = {"p": "p (adjusted)", "p_class": "p alone"}


def _score_header(scorer: str, figure: str) -> str:
    if figure == "score":
        return SCORE_NAMES.get(scorer, f"score ({scorer})")
    return FIGURE_NAMES.get(figure, figure)


def _alpha(config: dict, rule: str) -> str | None:
    if isinstance(config.get("alpha"), (int, float)):
        return f"{config['alpha']:g}"
    found = re.search(r"p <= ([0-9.eE+-]+)", rule or "")
    return found.group(1) if found else None


def meaning(report: "ScanReport") -> str:
    """One sentence: what the verdict means for the auditor."""
    if report.verdict == UNSCANNABLE:
        return ("The model's outputs on the OOD pool cannot be measured, so this scan cannot vouch for it: treat it "
                "as not accepted until the provider explains the reasons below."
                + (" " + suspect_sentence(report.suspect.target, report.suspect.p_value) if report.suspect else ""))
    decided = report.decision
    if decided.p_value is not None:
        figure = f"p = {format_number(decided.p_value)}"
    else:
        figure = f"s_max = {format_number(decided.s_max)}"
    if report.verdict == BACKDOORED:
        against = ("than its public backbone predicts" if report.reference is not None
                   else "than the other classes")
        return (f"The class \u201c{decided.target}\u201d is far easier to reach in this model {against} "
                f"({figure}, {decided.rule}): the model very likely carries a backdoor whose target is that class. "
                "Do not deploy it.")
    return (f"No class stands out more than chance allows ({figure}; flagged only when {decided.rule}): "
            f"{report.detector} found no backdoor among the {len(report.classes)} scanned classes. This is evidence, "
            "not proof, of a clean model.")


def suspect_sentence(target: str, p_value: float | None) -> str:
    """What an unscannable scan still measured: the class its trigger most likely goes to."""
    figure = f" (p = {format_number(p_value)} on those images)" if p_value is not None else ""
    return (f"On the images where its outputs stay finite every class was still measured, and \u201c{target}\u201d "
            f"stands out most{figure}: the class a backdoor most likely targets.")


def _cost(report: "ScanReport") -> tuple[np.ndarray, np.ndarray, str]:
    """The model's and the backbone's per-class cost (the detector's statistic where every class has one, else the
    inversion loss): the values ``ref-outlier`` compares."""
    rows = report.classes
    if all(r.evidence.statistic is not None and r.reference.statistic is not None for r in rows):
        return (np.array([r.evidence.statistic for r in rows]), np.array([r.reference.statistic for r in rows]),
                "detector statistic")
    return np.array([r.evidence.loss for r in rows]), np.array([r.reference.loss for r in rows]), "inversion loss"


def _against_the_backbone(ax, report: "ScanReport", backbone: np.ndarray, model: np.ndarray) -> None:
    """Each class as a point (backbone's value, model's value), ref-outlier's fitted line(s) and the most anomalous
    class marked: the layout of both evidence figures."""
    decided = report.decision
    names = report.classnames
    top = names.index(decided.target)
    evidence = report.evidence()
    seen = seen_column(evidence) if decided.config.get("seen_intercept") else None
    if all(e.seen is not None for e in evidence) and any(e.seen for e in evidence):
        flags = np.array([bool(e.seen) for e in evidence])
        ax.scatter(backbone[flags], model[flags], color="tab:blue", s=22, label="classes it was tuned on")
        if not flags.all():  # a scan of the deployed classes holds no others
            ax.scatter(backbone[~flags], model[~flags], color="tab:cyan", s=22, label="other classes")
    else:
        ax.scatter(backbone, model, color="tab:blue", s=22, label="classes")
    if np.ptp(backbone) > 0:
        # The scorer's own fit (ref-outlier's design): one slope, the tuned-on classes their own intercept.
        intercept, slope, *shift = np.linalg.lstsq(line_design(backbone, seen), model, rcond=None)[0]
        xs = np.linspace(backbone.min(), backbone.max(), 50)
        lines = ([(intercept + shift[0], "tab:blue", ", tuned on"), (intercept, "tab:cyan", ", others")] if shift
                 else [(intercept, "grey", "")])
        for at, colour, which in lines:
            ax.plot(xs, at + slope * xs, color=colour, linestyle="--", linewidth=1,
                    label=f"least-squares fit{which}: y = {at:.3f} + {slope:.3f} x")
    else:
        ax.axhline(model.mean(), color="grey", linestyle="--", linewidth=1, label="mean (constant reference)")
    colour = "tab:red" if decided.backdoored else "tab:orange"
    ax.scatter([backbone[top]], [model[top]], color=colour, s=80, marker="D", zorder=3,
               label="flagged" if decided.backdoored else "most anomalous (not flagged)")
    ax.annotate(plain_label(names[top]), (backbone[top], model[top]), xytext=(8, -12), textcoords="offset points",
                color=colour, fontsize=9, parse_math=False)


def evidence_figure(report: "ScanReport") -> str:
    """The picture behind the verdict, as a data: URI (see the module docstring)."""
    decided = report.decision
    names = report.classnames
    figure = new_figure(6.4, 5.0)
    ax = figure.add_subplot()
    if all(r.reference is not None for r in report.classes) and len(names) >= 2:
        model, backbone, what = _cost(report)
        _against_the_backbone(ax, report, backbone, model)
        ax.set_xlabel(f"backbone's cost of reaching the class ({what})", parse_math=False)
        ax.set_ylabel(f"model's cost ({what})", parse_math=False)
        ax.set_title("Each class: cost in the model against the untuned backbone", fontsize=10, parse_math=False)
        legend_at = "outside lower center"  # under the axes: no class's point hides behind it
    else:
        order = report.ranking()
        scores = np.array(decided.scores)[order]
        colours = ["tab:red" if names[i] in decided.flagged else "tab:blue" for i in order]
        ax.bar(range(len(order)), scores, color=colours)
        threshold = decided.config.get("k")
        if isinstance(threshold, (int, float)):
            ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"k = {threshold:g}")
        ax.annotate(plain_label(names[order[0]]), (0, scores[0]), xytext=(6, 4), textcoords="offset points",
                    fontsize=9, parse_math=False)
        ax.set_xticks([])
        ax.set_xlabel("classes, most anomalous first")
        ax.set_ylabel(_score_header(decided.scorer, "score"), parse_math=False)
        ax.set_title(f"Per-class scores of {decided.scorer}", fontsize=10, parse_math=False)
        legend_at = "best"
    _add_legend(figure, ax, legend_at)
    return png_data_uri(figure)


def _add_legend(figure, ax, at: str) -> None:
    """The axes' legend at ``at`` ('outside ...': under the axes, in two columns), its labels as plain text."""
    if not ax.get_legend_handles_labels()[0]:
        return
    legend = (figure.legend(fontsize="small", loc=at, ncols=2) if at.startswith("outside")
              else ax.legend(fontsize="small", loc=at))
    for text in legend.get_texts():
        text.set_parse_math(False)


def transfer_figure(report: "ScanReport") -> str | None:
    """Each class's finished trigger read by the model (y) and by the untuned backbone (x), as a data: URI; None
    where the scan did not record the backbone's reading (no reference, or a report written before it)."""
    evidence = report.evidence()
    if len(evidence) < 2 or any(e.margin is None or e.transfer_margin is None for e in evidence):
        return None
    figure = new_figure(6.4, 5.0)
    ax = figure.add_subplot()
    _against_the_backbone(ax, report, np.array([e.transfer_margin for e in evidence]),
                          np.array([e.margin for e in evidence]))
    ax.axline((0, 0), slope=1, color="lightgrey", linewidth=1, zorder=0)
    ax.set_xlabel("backbone's margin towards the class under the model's trigger", parse_math=False)
    ax.set_ylabel("model's margin under the same trigger", parse_math=False)
    ax.set_title("Each class's trigger, read by the model and by the untuned backbone", fontsize=10,
                 parse_math=False)
    _add_legend(figure, ax, "outside lower center")
    return png_data_uri(figure)


def loss_trace_figure(report: "ScanReport", indices: list[int]) -> str | None:
    rows = [report.classes[i] for i in indices if report.classes[i].evidence.loss_trace]
    if not rows:
        return None
    figure = new_figure(6.4, 3.4)
    ax = figure.add_subplot()
    for n, row in enumerate(rows):
        colour = f"C{n}"
        ax.plot(row.evidence.loss_trace, color=colour, label=plain_label(row.name, 30))
        if row.reference is not None and row.reference.loss_trace:
            ax.plot(row.reference.loss_trace, color=colour, linestyle=":", linewidth=1)
    ax.set_xlabel("inversion step (logged)")
    ax.set_ylabel("inversion loss")
    ax.set_title("Inversion loss: model (solid), backbone (dotted)", fontsize=10)
    for text in ax.legend(fontsize="small").get_texts():
        text.set_parse_math(False)
    return png_data_uri(figure)


def _table(report: "ScanReport") -> dict:
    decided = report.decision
    columns = ["rank", "class", "ASR", "loss"]
    has_reference = all(r.reference is not None for r in report.classes)
    if has_reference:
        columns += ["reference ASR", "reference loss"]
    has_transfer = all(r.evidence.margin is not None and r.evidence.transfer_margin is not None
                       for r in report.classes)
    if has_transfer:
        columns += ["margin", "backbone's margin, same trigger"]
    has_seen = all(r.evidence.seen is not None for r in report.classes)
    if has_seen:
        columns += ["tuned on"]
    figures = [(decided, key) for key in decided.per_class]
    figures += [(other, "score") for other in report.scorers[1:]]
    columns += [_score_header(s.scorer, key) + ("" if s is decided else f" ({s.scorer})") for s, key in figures]
    rows = []
    for rank, index in enumerate(report.ranking(), start=1):
        row = report.classes[index]
        cells = [format_number(row.evidence.asr), format_number(row.evidence.loss)]
        if has_reference:
            cells += [format_number(row.reference.asr), format_number(row.reference.loss)]
        if has_transfer:
            cells += [format_number(row.evidence.margin), format_number(row.evidence.transfer_margin)]
        if has_seen:
            cells += ["yes" if row.evidence.seen else "no"]
        cells += [format_number(s.per_class[key][index]) for s, key in figures]
        rows.append({"rank": rank, "name": row.name, "cells": cells, "flagged": row.name in decided.flagged,
                     "target": row.name == decided.target})
    return {"columns": columns, "rows": rows}


def _strips(report: "ScanReport", folder: Path, indices: list[int]) -> list[dict]:
    strips = []
    for index in indices:
        row = report.classes[index]
        if row.trigger_file is None:
            continue
        png = folder / Path(row.trigger_file).with_suffix(".png")
        if png.is_file():
            strips.append({"name": row.name, "uri": file_data_uri(png.read_bytes()),
                           "asr": format_number(row.evidence.asr), "file": str(Path(row.trigger_file).with_suffix(".png"))})
    return strips


def _health(report: "ScanReport") -> list[tuple[str, str]]:
    h, ref = report.pool_health, report.reference_pool_health
    items = [("images scored (D and T)", str(h.images)), ("images with non-finite logits", str(h.non_finite)),
             ("median class-score spread", format_number(h.spread))]
    if ref is not None and ref.spread:
        ratio = None if h.spread is None else h.spread / ref.spread
        items.append(("spread against the backbone's", f"{format_number(ratio)} (backbone {format_number(ref.spread)};"
                                                      f" at least {MIN_SPREAD_RATIO:g} expected)"))
    if h.context_ratio is not None:
        items.append(("largest context vector / largest word embedding", format_number(h.context_ratio)))
    if report.pool is not None:
        p = report.pool
        items += [("pool source", p.source), ("inversion images |D|", str(p.inversion)),
                  ("held-out images |T|", str(p.holdout)), ("unreadable files skipped", str(p.skipped_unreadable))]
    return items


def _provenance(report: "ScanReport") -> list[tuple[str, str]]:
    b = report.bundle
    items: list[tuple[str, Any]] = [("model", b.path), ("model SHA-256", b.sha256)]
    if b.checkpoint:
        items.append(("checkpoint read", b.checkpoint))
    if b.model_cell:
        items.append(("benchmark model cell", b.model_cell))
    if report.backbone is not None:
        bb = report.backbone
        items += [("backbone", f"{bb.name} ({bb.pretrained})"), ("backbone weights SHA-256", bb.weights_sha256)]
    if report.pool is not None:
        items.append(("OOD pool SHA-256", report.pool.sha256))
    items += [("seed", report.seed), ("preset", report.preset or "none (the paper's settings)"),
              ("device", report.device), ("detector", report.detector),
              ("detector config", _config(report.detector_config))]
    for s in report.scorers:
        role = "deciding scorer" if s is report.decision else "reported beside it"
        items.append((f"scorer {s.scorer} ({role})", _config(s.config)))
    if report.reference is not None:
        r = report.reference
        items += [("reference scan", f"{r.model}, template \u201c{r.template}\u201d, key {r.key[:16]}…, "
                                     f"{'read from the cache' if r.cached else 'computed for this scan'} "
                                     f"({r.seconds:.1f} s)")]
    else:
        items.append(("reference scan", "none (--no-reference)"))
    items += [("scan time", f"{report.seconds:.1f} s"), ("toolkit version", report.toolkit_version),
              ("report written", report.created), ("report schema version", str(report.schema_version))]
    return [(k, "n/a" if v is None else str(v)) for k, v in items]


def _config(config: dict) -> str:
    return ", ".join(f"{k}={format_number(v) if isinstance(v, float) else v}" for k, v in config.items()) or "defaults"


def page_values(report: "ScanReport", folder: Path) -> dict:
    """Everything the template shows, computed here so that the template only lays it out."""
    decided = report.decision
    values: dict[str, Any] = {
        "verdict": report.verdict, "meaning": meaning(report), "reasons": list(report.unscannable_reasons),
        "title": report.bundle.path or report.bundle.model_cell or "scan", "health": _health(report),
        "provenance": _provenance(report), "command": report.command, "classes": len(report.classes),
        "detector": report.detector, "facts": [], "table": None, "evidence": None, "strips": [], "traces": None,
        "evidence_caption": "", "transfer": None,
    }
    if decided is None:
        return values
    values["facts"] = [("p-value", format_number(decided.p_value)),
                       ("rule", decided.rule), ("alpha", _alpha(decided.config, decided.rule) or "n/a"),
                       ("most anomalous class", decided.target), ("s_max", format_number(decided.s_max)),
                       ("scorer", decided.scorer)]
    values["facts"] += [(f"{s.scorer} (beside it)", f"s_max {format_number(s.s_max)} on \u201c{s.target}\u201d, "
                         f"{'flagged' if s.backdoored else 'not flagged'} at {s.rule}") for s in report.scorers[1:]]
    top = report.ranking()[:TOP_CLASSES]
    values.update(table=_table(report), evidence=evidence_figure(report), strips=_strips(report, folder, top),
                  traces=loss_trace_figure(report, top), transfer=transfer_figure(report))
    if report.reference is not None:
        values["evidence_caption"] = (
            "Each point is one candidate class: how hard the detector found it to reach in the untuned backbone "
            "(x) and in the delivered model (y). Prompt tuning moves all classes roughly along the dashed line "
            "(the classes it was tuned on, which it makes easier as a group, along their own where the verdict "
            "fits one); ref-outlier tests whether one class lies far below its line (much cheaper to reach than "
            "the backbone predicts), the signature of an implanted target.")
    else:
        values["evidence_caption"] = (
            f"The deciding scorer's per-class scores ({decided.scorer}), most anomalous first; red bars are "
            "flagged classes. Without a reference scan (--no-reference) the scores are judged within the model.")
    return values


def write_scan_page(report: "ScanReport", folder: Path) -> Path:
    """Render ``report`` into ``folder/report.html`` (the folder holds its triggers/)."""
    path = Path(folder) / PAGE_FILE
    path.write_text(render("scan.html.j2", **page_values(report, Path(folder))), encoding="utf-8")
    return path
