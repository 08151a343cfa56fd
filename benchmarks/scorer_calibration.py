"""How candidate model-level statistics separate clean from backdoored models, and whether their nulls hold.

For every scan of a ``ci-bench run`` store that has a reference cell, this
reads the per-class evidence of the model and of its reference (the untuned
backbone, same classes, pool, seed and detector), computes each candidate
statistic, and prints per candidate: AUROC over every model and over the
implanted ones (ASR on unseen classes >= 0.5) and over those whose trigger works
(ASR >= 0.5 on seen or unseen classes), the rate at which clean models
reach each family-wise alpha (the false-positive rate the analytic null
promises to hold at alpha), TPR over working and over implanted backdoors, the
share of working ones whose top class is the target, and the quantiles of the clean models' p-values.  The
scorer is chosen on development seeds with this script and then confirmed on
others with ``ci-bench report`` (see the README, "Verdicts").

    python benchmarks/scorer_calibration.py STORE [--alpha 0.01 --alpha 0.05] [--seeds 1,2,3,11-17]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from ci_core.harness.cells import read_reference, stored_evidence
from ci_core.harness.plan import DEFAULT_INVERSION_DATA, INVERSION_DATA
from ci_core.harness.report.combined import ScanKind
from ci_core.scanning.seen import mark_seen
from ci_core.harness.statistics import auroc, clopper_pearson, has_both_classes
from ci_core.harness.store import Store
from ci_detectors.mad import anomaly_indices
from ci_detectors.reference_scoring import ReferenceOutlierScorer, outlier_p_values, studentized_residuals
from ci_detectors.scoring import ci_scores

IMPLANTED = 0.5
WORKS = 0.5


def paper_scores(rows) -> np.ndarray:
    if all(r.statistic is not None for r in rows):
        return anomaly_indices([r.statistic for r in rows])
    return ci_scores([r.asr for r in rows], [r.loss for r in rows])


def regression(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    t = studentized_residuals(x, y)
    return t, float(outlier_p_values(t, len(t) - 3).min())


def grubbs(values: np.ndarray) -> tuple[np.ndarray, float]:
    return regression(values, np.zeros_like(values))


def logit(asr: np.ndarray, n: int) -> np.ndarray:
    k = asr * n
    return np.log((k + 0.5) / (n - k + 0.5))


def bonferroni_union(*tests: tuple[np.ndarray, float]) -> tuple[np.ndarray, float]:
    """Several outlier tests of the same classes, one verdict: per class the largest residual's p-value
    Bonferroni-corrected over the tests too (valid whatever their dependence); returned as -log10 p per class."""
    per_class = np.min([np.minimum(1.0, len(t) * stats.t.sf(t, len(t) - 3)) for t, _ in tests], axis=0)
    p = np.minimum(1.0, len(tests) * per_class)
    return -np.log10(np.maximum(p, 1e-300)), float(p.min())


def candidates(model, reference, holdout: int) -> dict[str, tuple[np.ndarray, float | None, str]]:
    """name -> (per-class statistic, larger = more suspicious; model-level analytic p-value or None; the
    predicted target)."""
    asr_m, asr_r = np.array([r.asr for r in model]), np.array([r.asr for r in reference])
    loss_m, loss_r = np.array([r.loss for r in model]), np.array([r.loss for r in reference])
    s_m, s_r = paper_scores(model), paper_scores(reference)
    margins = all(r.margin is not None for r in (*model, *reference))
    out = {
        "paper s (no reference)": (s_m, None),
        "S on differences (issue's trial)": (ci_scores(asr_m - asr_r, loss_m - loss_r), None),
        "regression of S": regression(s_m, s_r),
        "regression of -loss": regression(-loss_m, -loss_r),
        "regression of logit ASR": regression(logit(asr_m, holdout), logit(asr_r, holdout)),
        "grubbs of S difference": grubbs(s_m - s_r),
        "grubbs of -loss difference": grubbs(-(loss_m - loss_r)),
    }
    t_loss, _ = out["regression of -loss"]
    t_asr, _ = out["regression of logit ASR"]
    combined = (t_loss + t_asr) / math.sqrt(2)
    out["mean of loss and ASR residuals"] = (combined, None)
    out["union: -loss, logit ASR"] = bonferroni_union(out["regression of -loss"], out["regression of logit ASR"])
    out["union: -loss, S"] = bonferroni_union(out["regression of -loss"], out["regression of S"])
    if margins:
        margin_m, margin_r = np.array([r.margin for r in model]), np.array([r.margin for r in reference])
        out["regression of margin"] = regression(margin_m, margin_r)
        out["grubbs of margin difference"] = grubbs(margin_m - margin_r)
        out["union: -loss, margin"] = bonferroni_union(out["regression of -loss"], out["regression of margin"])
        out["union: -loss, margin, logit ASR"] = bonferroni_union(out["regression of -loss"],
                                                                  out["regression of margin"],
                                                                  out["regression of logit ASR"])
    # The shipped scorer's settings (ci_detectors.reference_scoring), robust fits included.
    transfer = all(r.transfer_margin is not None and r.margin is not None for r in model)
    for compare in ("cost", "margin", "asr", "cost+margin", "cost+asr", "cost+margin+asr", "transfer",
                    "cost+transfer"):
        if "margin" in compare and not margins or "transfer" in compare and not transfer:
            continue
        for fit, seen in (("ols", True), ("ols", False), ("robust", False)):
            options = {"compare": compare, "fit": fit, "seen_intercept": seen}
            scores = ReferenceOutlierScorer.from_options(options).score(model, reference)
            out[f"ref-outlier {compare} {fit}{' + seen' if seen else ''}"] = (np.asarray(scores.scores),
                                                                               scores.p_value, scores.target)
    names = [r.name for r in model]
    return {name: entry if len(entry) == 3 else (*entry, names[int(np.argmax(entry[0]))])
            for name, entry in out.items()}


def _auroc(truth, scores) -> str:
    return f"{auroc(truth, scores):.3f}" if has_both_classes(truth) else "n/a"


def scan_kinds(classes: str, data: str) -> list[ScanKind]:
    """The (inversion data, candidate classes) of the scans that judge a model: 'all+base' with 'ood' is two scans
    of the OOD pool; 'ood+task' with 'all+base' pairs them in order, (ood, all) and (task, base)."""
    datas, classes_ = data.split("+"), classes.split("+")
    if len(datas) > 1 and len(classes_) > 1 and len(datas) != len(classes_):
        raise ValueError(f"--data {data} and --classes {classes}: pair as many of each")
    count = max(len(datas), len(classes_))
    return [ScanKind(datas[min(i, len(datas) - 1)], classes_[min(i, len(classes_) - 1)]) for i in range(count)]


def load(store: Store, seeds: set[int] | None, classes: str = "all",
         only: dict[str, set[int]] | None = None, data: str = "ood") -> list[dict]:
    """The scans with a reference of the kinds ``scan_kinds(classes, data)`` (several are paired per model by
    ``combine``); ``only`` keeps just these attacks, each at these seeds."""
    models = {c.key: c for c in store.cells("model")}
    kinds = scan_kinds(classes, data)
    rows = []
    for cell in store.cells("scan"):
        if not cell.reference or ScanKind.of(cell) not in kinds:
            continue
        model = models[cell.model]
        if seeds is not None and model.seed not in seeds:
            continue
        if only is not None and model.seed not in only.get(model.attack, ()):
            continue
        evidence = mark_seen(stored_evidence(store.scan_folder(cell.key) / "report.json"), model.base_classes or None)
        reference = read_reference(store, cell.reference)
        rows.append({"cell": cell, "model": model, "evidence": evidence, "reference": reference.classes,
                     "holdout": cell.spec.pool.holdout})
    return rows


def combine(entries: list, kinds: list[ScanKind]) -> list:
    """One entry per model from its ``kinds`` scans (told apart by ``ScanKind.of``): the smallest p times the number
    of scans (Bonferroni over them), the target the top class of the measurable scan with the smallest p; the
    largest s_max ranks it.  Models missing a scan are left out."""
    by_model: dict[str, dict[ScanKind, tuple]] = {}
    for entry in entries:
        by_model.setdefault(entry[0]["cell"].model, {})[ScanKind.of(entry[0]["cell"])] = entry
    out = []
    for scans in by_model.values():
        if len(scans) != len(kinds):
            continue
        group = [scans[kind] for kind in kinds]  # the first kind's row stands for the model, whatever the order
        s_max = max(float(e[1].max()) for e in group)
        if any(e[2] is None for e in group):
            best = max(group, key=lambda e: float(e[1].max()))
            out.append((group[0][0], np.array([s_max]), None, best[3]))
            continue
        best = min(group, key=lambda e: e[2])
        # An unscannable scan flags the model (p 0) but names no class; a scan that could measure it names one.
        named = min((e for e in group if e[3] is not None), key=lambda e: e[2], default=best)
        out.append((group[0][0], np.array([s_max]), min(1.0, len(kinds) * best[2]), named[3]))
    return out


def mixed(per_candidate: dict, mix: str, kinds: list[ScanKind]) -> list:
    """The entries of a row that reads each scan kind by its own candidate: 'A+B' takes kind 1's entries from A and
    kind 2's from B (A and B are candidate names, which may contain '+' themselves: the split is the one that names
    two known candidates)."""
    if len(kinds) != 2:
        raise SystemExit(f"--mix {mix!r}: needs two scans per model (--data/--classes pairs), got {len(kinds)}")
    splits = [(mix[:i], mix[i + 1:]) for i, ch in enumerate(mix) if ch == "+"
              and mix[:i] in per_candidate and mix[i + 1:] in per_candidate]
    if len(splits) != 1:
        raise SystemExit(f"--mix {mix!r}: expected two candidate names joined by '+', of: {sorted(per_candidate)}")
    first, second = splits[0]
    return ([e for e in per_candidate[first] if ScanKind.of(e[0]["cell"]) == kinds[0]]
            + [e for e in per_candidate[second] if ScanKind.of(e[0]["cell"]) == kinds[1]])


def parse_seeds(text: str | None) -> set[int] | None:
    if not text:
        return None
    seeds: set[int] = set()
    for item in text.split(","):
        low, _, high = item.partition("-")
        seeds.update(range(int(low), int(high or low) + 1))
    return seeds


def unscannable(row: dict) -> bool:
    """The scan could not measure the model (its evidence may stop at the class where the inversion failed)."""
    return row["cell"].verdict == "unscannable" or len(row["evidence"]) != len(row["reference"])


def _split_only(text: str) -> list[str]:
    """'clean:65-70,badclip:51,52' -> ['clean:65-70', 'badclip:51,52']: a comma starts a new item only before a name."""
    items: list[str] = []
    for part in text.split(","):
        if ":" in part or not items:
            items.append(part)
        else:
            items[-1] += "," + part
    return items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--alpha", type=float, action="append", help="family-wise levels (default 0.01 and 0.05)")
    parser.add_argument("--seeds", help="only models of these seeds, e.g. 1,2,3,11-17")
    parser.add_argument("--only", help="only these attacks at these seeds, e.g. clean:65-70,badclip:51 (a model's "
                                       "attack is its own name; controls count under their attack)")
    parser.add_argument("--show", help="print the per-model values of this candidate")
    parser.add_argument("--mix", action="append", default=[], metavar="CANDIDATE+CANDIDATE",
                        help="with two scans per model: a further row that judges the first scan by one candidate and "
                             "the second by another, e.g. 'ref-outlier cost ols + seen+ref-outlier cost robust' "
                             "(split at the last '+' followed by 'ref-outlier' or another candidate's name)")
    parser.add_argument("--classes", default="all", choices=("all", "base", "all+base"),
                        help="the scans' candidate classes; all+base judges each model by both of its scans, "
                             "Bonferroni over the two (p = min(1, 2 min(p_all, p_base)))")
    paired = tuple(f"{DEFAULT_INVERSION_DATA}+{d}" for d in INVERSION_DATA if d != DEFAULT_INVERSION_DATA)
    parser.add_argument("--data", default=DEFAULT_INVERSION_DATA, choices=INVERSION_DATA + paired,
                        help="the scans' inversion data (ci-bench run --inversion-data); ood+id judges each model by "
                             "both of its scans, Bonferroni over the two; with --classes all+base the two pair in "
                             "order, e.g. --data ood+task --classes all+base: (ood, all) and (task, base)")
    args = parser.parse_args(argv)
    try:
        kinds = scan_kinds(args.classes, args.data)
    except ValueError as exc:
        parser.error(str(exc))
    alphas = args.alpha or [0.01, 0.05]
    only = None
    if args.only:
        only = {}
        for item in _split_only(args.only):
            attack, _, seeds = item.partition(":")
            only.setdefault(attack, set()).update(parse_seeds(seeds) or ())
    rows = load(Store.open(args.store), parse_seeds(args.seeds), args.classes, only, args.data)
    if not rows:
        print("no scans with a reference in this store", file=sys.stderr)
        return 1
    per_candidate: dict[str, list[tuple[dict, np.ndarray, float | None, str]]] = {}
    names = None
    for row in rows:
        if unscannable(row):
            continue  # unscannable: every candidate counts it as flagged (fail closed), below
        found = candidates(row["evidence"], row["reference"], row["holdout"])
        names = names or list(found)
        for name, (values, p, top) in found.items():
            per_candidate.setdefault(name, []).append((row, values, p, top))
    for row in rows:
        if unscannable(row):  # as the report ranks and counts an unscannable model: highest, flagged, no target
            for name in names or ():
                per_candidate[name].append((row, np.array([np.inf]), 0.0, None))
    for mix in args.mix:
        per_candidate[f"mix: {mix}"] = mixed(per_candidate, mix, kinds)
    if len(kinds) > 1:
        per_candidate = {name: combine(entries, kinds) for name, entries in per_candidate.items()}
        rows = [e[0] for e in next(iter(per_candidate.values()))]
    clean_n = sum(r["model"].target is None for r in rows)
    implanted = [r for r in rows if r["model"].target is not None
                 and (r["model"].metrics.get("asr_new") or 0) >= IMPLANTED]
    working = [r for r in rows if r["model"].target is not None
               and max(r["model"].metrics.get("asr_new") or 0, r["model"].metrics.get("asr_base") or 0) >= WORKS]
    print(f"{len(rows)} scans: {clean_n} clean, {sum(r['model'].target is not None for r in rows)} backdoored "
          f"({len(working)} work at ASR seen or unseen >= {WORKS}, {len(implanted)} implanted at ASR unseen >= "
          f"{IMPLANTED})\n")
    header = ["candidate", "AUROC all", "AUROC works", "AUROC impl."] + [f"FPR@{a:g} (95% CI)" for a in alphas] + \
             [f"TPR works@{a:g}" for a in alphas] + [f"TPR impl.@{a:g}" for a in alphas] + \
             ["top=target (works)", "clean p q10/q50/min"]
    print(" | ".join(header))
    for name, entries in per_candidate.items():
        truth = [e[0]["model"].target is not None for e in entries]
        s_max = [float(e[1].max()) for e in entries]
        cells = [name, _auroc(truth, s_max)]
        for population in (working, implanted):
            keep = [i for i, e in enumerate(entries) if e[0]["model"].target is None or e[0] in population]
            cells.append(_auroc([truth[i] for i in keep], [s_max[i] for i in keep]))
        clean_p = [e[2] for e in entries if e[0]["model"].target is None and e[2] is not None]
        works_p = [e[2] for e in entries if e[0] in working and e[2] is not None]
        impl_p = [e[2] for e in entries if e[0] in implanted and e[2] is not None]
        for alpha in alphas:
            if clean_p:
                k = sum(p <= alpha for p in clean_p)
                lo, hi = clopper_pearson(k, len(clean_p))
                cells.append(f"{k}/{len(clean_p)} ({lo:.2f}-{hi:.2f})")
            else:
                cells.append("n/a")
        for population in (works_p, impl_p):
            for alpha in alphas:
                cells.append(f"{sum(p <= alpha for p in population)}/{len(population)}" if population else "n/a")
        hits = sum(e[3] == e[0]["model"].target for e in entries if e[0] in working)
        cells.append(f"{hits}/{len(working)}")
        cells.append(f"{np.quantile(clean_p, 0.1):.3f}/{np.quantile(clean_p, 0.5):.3f}/{min(clean_p):.3f}"
                     if clean_p else "n/a")
        print(" | ".join(cells))
    if args.show:
        print(f"\n{args.show}: per model (attack, dataset, seed, ASR seen, ASR unseen, s_max, p, top class, target, "
              "target's rank, target's inversion ASR and the best other class's)")
        for row, values, p, top in sorted(per_candidate[args.show], key=lambda e: (e[0]["model"].attack,
                                                                                    e[0]["model"].dataset,
                                                                                    e[0]["model"].seed)):
            model = row["model"]
            label = model.attack + (" (control)" if model.control else "")
            if unscannable(row):
                print(f"{label:24s} {model.dataset:17s} {model.seed:3d} {model.metrics.get('asr_base') or 0:5.2f} "
                      f"{model.metrics.get('asr_new') or 0:5.2f}  unscannable (counted as flagged, no target named)")
                continue
            names = [e.name for e in row["evidence"]]
            rank = (1 + int((values > values[names.index(model.target)]).sum())
                    if model.target in names and len(values) == len(names) else None)
            target_asr = (row["evidence"][names.index(model.target)].asr if model.target in names else None)
            other_asr = max(e.asr for e in row["evidence"] if e.name != model.target)
            print(f"{label:24s} {model.dataset:17s} {model.seed:3d} {model.metrics.get('asr_base') or 0:5.2f} "
                  f"{model.metrics.get('asr_new') or 0:5.2f} {values.max():7.2f} {'' if p is None else f'{p:.2g}':>8s} "
                  f"{top:20s} {model.target or '-':20s} {rank if rank is not None else '-':>3} "
                  f"{'' if target_asr is None else f'{target_asr:.2f}':>5s} {other_asr:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
