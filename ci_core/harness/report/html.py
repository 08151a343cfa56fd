"""``ci-bench report``'s ``report.html``: every table ``build_report`` makes, and the figures, on one page.

The page is rendered from the report's plain JSON generically: each detector
group's sections (its verdict, model-level figures, class-level counts, ...)
become one table each with a row per group, each list of rows (per attack, per
repairer, failed cells, ...) a table of its own, and the columns are the keys
the rows hold.  So a figure or a table added to ``tables.py`` appears here
without an edit; ``TITLES`` and ``HEADERS`` only give known ones nicer names.
Same style and safety as a scan's page (``ci_core.pages``): autoescaped Jinja2,
no script, figures embedded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from ci_core.harness.plan import variant_label
from ci_core.harness.report.markdown import _fmt
from ci_core.pages import file_data_uri, render

PAGE_FILE = "report.html"

# Section titles, and the DEFINITIONS entry that explains each (None: no definition).
TITLES = {
    "verdict": ("Verdicts", "verdict"),
    "model_level": ("Model-level detection (Figure 4)", "model_level"),
    "implanted": ("Model-level detection over backdoors that implanted", "implanted"),
    "class_level": ("Class-level target detection (Tables 2-3)", "class_level"),
    "anomaly_by_attack": ("Anomaly score per attack (Figure 5)", "anomaly"),
    "reconstruction": ("Reconstructed triggers (Tables 4, 15-17, 24)", "reconstruction"),
    "cost": ("Cost of a scan", "statistics"),
    "attacks": ("Attacks: ACC and ASR on seen and unseen classes (Tables 7-10)", "attack"),
    "repairs": ("Repair (Table 19)", "repair"),
    "repair_check": ("Repair of working backdoors: the aim and the controls", "repair_check"),
    "skipped_repairs": ("Not repaired (left out by the plan, or no trigger to repair with; not failures)", None),
    "broken": ("Cells whose files do not check out (left out; the next run redoes them)", None),
    "failures": ("Failed cells", None),
    "pending": ("Planned cells without a result", None),
}
# Which figure follows which section.
FIGURE_AFTER = {"roc.png": "model_level", "anomaly_scores.png": "anomaly_by_attack"}
HEADERS = {
    "label": "detector / scorer", "rule": "flags when", "auroc_all": "AUROC (all)",
    "auroc_implanted": "AUROC (implanted)", "fpr": "FPR", "fpr_ci95": "FPR 95% CI", "tpr": "TPR",
    "target_accuracy": "target named", "auroc": "AUROC", "accuracy": "ACC", "min_asr_unseen": "ASR unseen ≥",
    "top_is_target": "top = target", "tp": "TP", "fp": "FP", "fn": "FN", "tn": "TN", "f1": "F1", "s_max": "s_max",
    "acc_seen": "ACC seen", "acc_unseen": "ACC unseen", "asr_seen": "ASR seen", "asr_unseen": "ASR unseen",
    "scan_hit": "ĉ = target", "acc_seen_change": "ACC seen change", "beats_controls": "beats every control",
    "floor_seen": "floor seen", "floor_unseen": "floor unseen", "at_floor": "at the floor",
    "youden.threshold": "Youden τ", "youden.j": "J", "youden.tpr": "TPR@τ",
    "youden.fpr": "FPR@τ", "k": "k",
}
# Group keys shown in the overview rather than as sections; a row's lists longer than this are not cells.
OVERVIEW = ("label", "detector", "scorer", "variant", "detector_config", "scorer_config", "pool")
MAX_LIST_CELL = 4


def _header(key: str) -> str:
    if key in HEADERS:
        return HEADERS[key]
    for suffix, word in (("_before", " before"), ("_after", " after")):
        if key.endswith(suffix) and key[:-len(suffix)] in HEADERS:
            return HEADERS[key[:-len(suffix)]] + word
    return key.replace("_", " ").replace(".", " ")


def _is_mean_std(value: Any) -> bool:
    return isinstance(value, dict) and "mean" in value and "std" in value


def _cells(row: dict, prefix: str = "") -> Iterable[tuple[str, str]]:
    """(column, shown value) of a row: scalars, mean ± std, short lists; nested objects flattened as a.b (where a
    list is a curve, such as the ROC's points, and is left to the figures)."""
    for key, value in row.items():
        name = f"{prefix}{key}"
        if value is None or isinstance(value, (str, int, float, bool)) or _is_mean_std(value):
            yield name, _fmt(value)
        elif isinstance(value, dict):
            if all(not isinstance(v, (dict, list)) for v in value.values()) and key.endswith("config"):
                yield name, ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "defaults"
            else:
                yield from _cells(value, f"{name}.")
        elif not prefix and isinstance(value, (list, tuple)) and len(value) <= MAX_LIST_CELL and all(
                not isinstance(v, (dict, list)) for v in value):
            yield name, "–".join(_fmt(v) for v in value) if key.endswith("ci95") else ", ".join(_fmt(v) for v in value)
        # longer lists (ROC curves) and lists of rows are not cells: the latter are tables of their own


def table(rows: Sequence[dict]) -> dict:
    """Columns: every key the rows hold, in first-seen order; a missing cell is empty."""
    columns: list[str] = []
    shown = []
    for row in rows:
        cells = dict(_cells(row))
        shown.append(cells)
        columns += [c for c in cells if c not in columns]
    return {"columns": [_header(c) for c in columns], "rows": [[cells.get(c, "") for c in columns] for cells in shown]}


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _section(key: str, definitions: dict, tables: list[dict], figures: dict[str, str]) -> dict:
    title, definition = TITLES.get(key, (key.replace("_", " ").capitalize(), key if key in definitions else None))
    after = [{"name": name, "uri": uri} for name, uri in figures.items() if FIGURE_AFTER.get(name) == key]
    return {"key": key, "title": title, "definition": definitions.get(definition) if definition else None,
            "tables": tables, "figures": after}


def group_sections(groups: Sequence[dict], definitions: dict, figures: dict[str, str]) -> list[dict]:
    """One section per key of the detector groups: a row per group (a dict), or per group and item (a list of rows);
    a dict of row lists (class-level counts by dataset, by attack) is one table per entry."""
    keys: list[str] = []
    for g in groups:
        keys += [k for k in g if k not in keys and k not in OVERVIEW]
    sections = []
    for key in keys:
        values = [(g, g.get(key)) for g in groups]
        tables, subsections = [], []
        if any(isinstance(v, dict) and v and all(_is_rows(x) for x in v.values()) for _, v in values):
            subkeys: list[str] = []
            for _, v in values:
                subkeys += [s for s in (v or {}) if s not in subkeys]
            for sub in subkeys:
                rows = [{"label": g["label"], **item} for g, v in values for item in (v or {}).get(sub, [])]
                tables.append({"caption": f"per {sub}", **table(rows)})
        elif any(_is_rows(v) for _, v in values):
            tables.append({"caption": None, **table([{"label": g["label"], **item} for g, v in values
                                                      for item in (v or [])])})
        elif any(isinstance(v, dict) for _, v in values):
            tables.append({"caption": None, **table([{"label": g["label"], **v} for g, v in values
                                                      if isinstance(v, dict)])})
            # lists of rows inside each group's section (model_level's "implanted") are sections of their own
            for sub in sorted({s for _, v in values if isinstance(v, dict) for s, x in v.items() if _is_rows(x)}):
                rows = [{"label": g["label"], **item} for g, v in values if isinstance(v, dict) for item in v.get(sub, [])]
                subsections.append(_section(sub, definitions, [{"caption": None, **table(rows)}], figures))
        if tables:
            sections.append(_section(key, definitions, tables, figures))
        sections += subsections
    return _main_first(sections)


def _main_first(sections: list[dict]) -> list[dict]:
    """Known sections in the order of ``TITLES`` (the markdown's), the others after them as they came."""
    order = list(TITLES)
    return sorted(sections, key=lambda s: order.index(s["key"]) if s["key"] in order else len(order))


def page_values(report: dict, figures: dict[str, str]) -> dict:
    definitions = report.get("definitions", {})
    groups = report.get("detectors", [])
    overview = table([{"label": g["label"], "variant": variant_label(g["variant"]) if isinstance(g.get("variant"), dict)
                       else g.get("variant"), **{k: g[k] for k in OVERVIEW if k in g and k not in ("label", "variant")}}
                      for g in groups])
    sections = group_sections(groups, definitions, figures)
    for key, value in report.items():
        if key in ("detectors", "definitions", "counts", "store"):
            continue
        if isinstance(value, dict) and any(_is_rows(v) for v in value.values()):  # e.g. repair_check: per attack, model
            sections.append(_section(key, definitions, [{"caption": f"per {sub[:-1] if sub.endswith('s') else sub}",
                                                         **table(rows)} for sub, rows in value.items() if _is_rows(rows)],
                                     figures))
        elif not isinstance(value, list):
            continue
        elif _is_rows(value):
            sections.append(_section(key, definitions, [{"caption": None, **table(value)}], figures))
        elif key == "failures":
            sections.append({**_section(key, definitions, [], figures), "empty": "None."})
    placed = {f["name"] for s in sections for f in s["figures"]}
    extra = [{"name": name, "uri": uri} for name, uri in figures.items() if name not in placed]
    counts = [(_header(k), _fmt(v)) for k, v in report.get("counts", {}).items()]
    prior = report.get("variance_prior")
    if prior:  # the calibrated scorer read every scan with its setting's prior from this book
        counts.append(("variance prior", f"{prior['book']} ({prior['settings']} settings)"))
    return {"store": report.get("store", ""), "counts": counts,
            "overview": {"caption": None, **overview}, "sections": sections, "extra_figures": extra,
            "statistics": definitions.get("statistics")}


def write_bench_page(report: dict, folder: Path, figures: Sequence[str]) -> Path:
    """Render ``report`` (``build_report``'s JSON) into ``folder/report.html``, embedding the PNG ``figures`` there."""
    embedded = {name: file_data_uri((Path(folder) / name).read_bytes()) for name in figures}
    path = Path(folder) / PAGE_FILE
    path.write_text(render("bench.html.j2", **page_values(report, embedded)), encoding="utf-8")
    return path
