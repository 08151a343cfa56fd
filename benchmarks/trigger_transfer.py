"""Does each reconstructed trigger belong to the model, or would the backbone answer to it as well?

For every scan of a ``ci-bench run`` store that has a reference cell, this
measures, per candidate class c, the held-out margin towards c (T images, the
scan's pool) in the four crossings of {the model's trigger for c, the
backbone's trigger for c} x {evaluated on the model, on the backbone}:

    mm = margin_model(delta_model)    mb = margin_model(delta_backbone)
    bm = margin_backbone(delta_model) bb = margin_backbone(delta_backbone)

The backbone's triggers are the reference scan's (recomputed: the reference
cell stores evidence, not triggers; same detector, pool, seed and per-class
random streams).  ``interaction = (mm - bm) - (mb - bb)`` is how much more the
model answers to its own trigger than to the backbone's, beyond how much it
answers to the backbone's trigger more than the backbone does: a class the
model merely favours moves both, a trigger the model alone answers to moves
only the first.  Results go to a JSON file per store (``--out``), read by
``--analyse``.

    python benchmarks/trigger_transfer.py STORE --out transfer.json [--kinds ood/all,task/base]
    python benchmarks/trigger_transfer.py --analyse transfer.json [transfer2.json ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ci_core.files import write_json_atomic as write_json
from ci_core.harness.cells import cached_backbone, inversion_pool, stored_evidence
from ci_core.harness.report.combined import ScanKind
from ci_core.harness.store import Store
from ci_core.learning.evaluation import mean_margin, predict_logits
from ci_core.models.bundle import load_bundle
from ci_core.models.zeroshot import ZeroShotCLIP
from ci_core.plugins import registry
from ci_detectors.reference_scoring import outlier_p_values, studentized_residuals_on
from ci_core.scanning.inversion import invert_classes
from ci_core.scanning.scan_triggers import ScanTriggers

WORKS = 0.5


def margins(model, triggers, images, classnames) -> list[float]:
    """Each class's mean margin under its own trigger (as a scan measures ``margin`` and ``transfer_margin``)."""
    return [mean_margin(model, predict_logits(model, trigger.apply(images), classnames), index)
            for index, trigger in enumerate(triggers)]


@torch.no_grad()
def clean_margins(model, images, classnames) -> list[float]:
    """Each class's mean margin on the untouched images: where the classifier already stands before any trigger."""
    logits = predict_logits(model, images, classnames)
    return [mean_margin(model, logits, index) for index in range(len(classnames))]


def add_clean_margins(store_root: str, out: Path) -> None:
    """Add m0 and b0 (the model's and the backbone's margins on clean T) to the entries of ``out``."""
    store = Store.open(store_root)
    done = json.loads(out.read_text())
    models = {c.key: c for c in store.cells("model")}
    for number, cell in enumerate(store.cells("scan"), 1):
        entry = done.get(cell.key)
        if entry is None or "mm" not in entry or "m0" in entry:
            continue
        model_record = models[cell.model]
        backbone = cached_backbone(cell.spec.backbone.name, "builtin", "cpu")
        pool = inversion_pool(cell.spec.pool, model_record.dataset, None, backbone.image_size, cell.spec.seed,
                              entry["classes"])
        model, meta = load_bundle(store.bundle_path("model", cell.model), backbone)
        zero_shot = ZeroShotCLIP(backbone, meta["template"], own_visual=False).eval()
        entry["m0"] = clean_margins(model.eval(), pool.holdout, entry["classes"])
        entry["b0"] = clean_margins(zero_shot, pool.holdout, entry["classes"])
    write_json(out, done)


def measure(store_root: str, out: Path, kinds: list[ScanKind]) -> None:
    store = Store.open(store_root)
    models = {c.key: c for c in store.cells("model")}
    done = json.loads(out.read_text()) if out.exists() else {}
    references: dict[tuple, list] = {}
    cells = [c for c in store.cells("scan") if c.reference and ScanKind.of(c) in kinds]
    for number, cell in enumerate(cells, 1):
        if cell.key in done:
            continue
        clock = time.perf_counter()
        model_record = models[cell.model]
        evidence = stored_evidence(store.scan_folder(cell.key) / "report.json")
        names = [e.name for e in evidence]
        entry = {"attack": model_record.attack, "dataset": model_record.dataset, "seed": model_record.seed,
                 "control": model_record.control, "target": model_record.target, "kind": str(ScanKind.of(cell)),
                 "asr_seen": model_record.metrics.get("asr_base"), "asr_unseen": model_record.metrics.get("asr_new"),
                 "base": list(model_record.base_classes or ()), "classes": names, "verdict": cell.verdict,
                 "predicted": cell.predicted_target,
                 "p_value": cell.p_value}
        backbone = cached_backbone(cell.spec.backbone.name, "builtin", "cpu")
        if cell.verdict == "unscannable":
            done[cell.key] = entry
            continue
        spec = cell.spec
        pool = inversion_pool(spec.pool, model_record.dataset, None, backbone.image_size, spec.seed, names)
        model, meta = load_bundle(store.bundle_path("model", cell.model), backbone)
        model.eval()
        ref_key = (model_record.dataset, pool.digest(), tuple(names), meta["template"])
        if ref_key not in references:
            detector = registry().get("detector", spec.detector).from_options(spec.detector_config)
            zero_shot = ZeroShotCLIP(backbone, meta["template"], own_visual=False).eval()
            ref_evidence, problems = invert_classes(zero_shot, detector, pool, names, seed=spec.seed)
            assert not problems, problems
            references[ref_key] = (zero_shot, [e.trigger for e in ref_evidence])
        zero_shot, ref_triggers = references[ref_key]
        triggers = ScanTriggers.read(store.scan_folder(cell.key))
        own = [triggers.load(i) for i in range(len(names))]
        holdout = pool.holdout
        entry.update(mm=margins(model, own, holdout, names), mb=margins(model, ref_triggers, holdout, names),
                     bm=margins(zero_shot, own, holdout, names), bb=margins(zero_shot, ref_triggers, holdout, names),
                     loss=[e.loss for e in evidence])
        done[cell.key] = entry
        write_json(out, done)
        print(f"[{number}/{len(cells)}] {cell.label} {time.perf_counter() - clock:.1f}s", flush=True)
    write_json(out, done)


def _reg(y: np.ndarray, *columns: np.ndarray) -> tuple[float, int]:
    """Regression outlier test of y on the columns (with an intercept): Bonferroni p of the largest
    externally studentised residual, and its index."""
    design = np.column_stack([np.ones_like(y), *columns])
    t = studentized_residuals_on(design, y)
    p = outlier_p_values(t, len(y) - design.shape[1] - 1)
    top = int(np.argmax(t))
    return float(p[top]), top


def statistics_of(r: dict) -> dict[str, tuple[float, int]]:
    """Candidate model-level tests: name -> (p, index of the class it names)."""
    mm, mb, bm, bb = (np.array(r[k]) for k in ("mm", "mb", "bm", "bb"))
    seen = np.array([c in set(r["base"]) for c in r["classes"]], dtype=float)
    with_seen = 3 <= seen.sum() <= len(seen) - 3
    out = {
        "margin on backbone's margin (bb)": _reg(mm, bb),
        "margin on transfer (bm)": _reg(mm, bm),
        "margin on bm and bb": _reg(mm, bm, bb),
        "margin on bm and mb": _reg(mm, bm, mb),
        "cost on transfer (bm)": _reg(-np.array(r["loss"]), bm),
        "grubbs mm - bm": _reg(mm - bm),
        "grubbs interaction": _reg((mm - bm) - (mb - bb)),
    }
    if "m0" in r:
        m0, b0 = np.array(r["m0"]), np.array(r["b0"])
        out["gain on gain"] = _reg(mm - m0, bm - b0)
        out["margin on bm and m0 - b0"] = _reg(mm, bm, m0 - b0)
        if with_seen:
            out["gain on gain + seen"] = _reg(mm - m0, bm - b0, seen)
            out["margin on bm, m0 - b0 + seen"] = _reg(mm, bm, m0 - b0, seen)
    if with_seen:
        out["margin on bm + seen"] = _reg(mm, bm, seen)
        out["margin on bm, bb + seen"] = _reg(mm, bm, bb, seen)
        out["margin on bm, mb + seen"] = _reg(mm, bm, mb, seen)
    return out


def analyse(paths: list[str], alpha: float = 0.05) -> None:
    from ci_core.harness.statistics import auroc
    rows = []
    for path in paths:
        rows.extend(json.loads(Path(path).read_text()).values())
    for kind in sorted({r["kind"] for r in rows}):
        print(f"\n== {kind}")
        table = []
        for r in rows:
            if r["kind"] != kind:
                continue
            backdoor = r["target"] is not None and not r["control"]
            works = backdoor and max(r["asr_seen"] or 0, r["asr_unseen"] or 0) >= WORKS
            entry = {"label": f"{r['attack']} {r['dataset']} s{r['seed']}", "clean": not backdoor, "works": works}
            ref_p = 0.0 if r["verdict"] == "unscannable" else r["p_value"]
            tests = {"stored verdict (ref-outlier)": (ref_p, None)}
            if "mm" in r:
                tests.update({k: (p, r["classes"][i]) for k, (p, i) in statistics_of(r).items()})
                best = tests["margin on transfer (bm)"]
                tests["union: verdict, transfer"] = (min(1.0, 2 * min(ref_p, best[0])), best[1])
            else:  # unscannable: fail closed
                tests.update({k: (0.0, None) for k in ("margin on transfer (bm)", "union: verdict, transfer")})
            entry["tests"] = tests
            entry["target"] = r["target"]
            table.append(entry)
        clean = [e for e in table if e["clean"]]
        works = [e for e in table if e["works"]]
        names = list(dict.fromkeys(k for e in table for k in e["tests"]))
        for name in names:
            have_c = [e for e in clean if name in e["tests"]]
            have_w = [e for e in works if name in e["tests"]]
            fp = sum(e["tests"][name][0] <= alpha for e in have_c)
            tp = sum(e["tests"][name][0] <= alpha for e in have_w)
            named = sum(e["tests"][name][1] == e["target"] for e in have_w)
            truth = [0] * len(have_c) + [1] * len(have_w)
            score = [-math.log10(max(e["tests"][name][0], 1e-300)) for e in have_c + have_w]
            small = min((e["tests"][name][0] for e in have_c), default=float("nan"))
            print(f"{name:34s} FPR {fp}/{len(have_c)}  TPR works {tp}/{len(have_w)}  named {named}/{len(have_w)}  "
                  f"AUROC {auroc(truth, score):.3f}  smallest clean p {small:.3g}")
        show = ("stored verdict (ref-outlier)", "margin on transfer (bm)", "margin on bm + seen")
        print("working backdoors (p; * = names the target):")
        for e in works + [c for c in clean if min(e2[0] for e2 in c["tests"].values()) <= alpha]:
            cells = "  ".join(f"{e['tests'][k][0]:.2g}{'*' if e['tests'][k][1] == e['target'] else ' '}"
                              for k in show if k in e["tests"])
            print(f"  {e['label']:40s} {cells}")


def pair_verdicts(paths: list[str], alpha: float = 0.05) -> None:
    """Each model judged by several tests at once (Bonferroni over them), its OOD and base-class scans paired."""
    from ci_core.harness.statistics import auroc
    by_model: dict[tuple, dict[str, dict]] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text()).values():
            by_model.setdefault((r["attack"], r["dataset"], r["seed"]), {})[r["kind"]] = r
    def tests_of(r: dict) -> dict[str, tuple[float, str | None]]:
        cost = (0.0 if r["verdict"] == "unscannable" else r["p_value"], r.get("predicted"))
        if "mm" not in r:
            return {"cost": cost, "transfer": (0.0, None)}
        stats_ = statistics_of(r)
        p, i = stats_.get("margin on bm + seen", stats_["margin on transfer (bm)"])
        return {"cost": cost, "transfer": (p, r["classes"][i])}
    combos = {"two-scan cost (frozen)": [("ood/all", "cost"), ("task/base", "cost")],
              "ood cost + ood transfer": [("ood/all", "cost"), ("ood/all", "transfer")],
              "two-scan transfer": [("ood/all", "transfer"), ("task/base", "transfer")],
              "two-scan cost + transfer (4)": [("ood/all", "cost"), ("task/base", "cost"), ("ood/all", "transfer"),
                                               ("task/base", "transfer")]}
    for name, parts in combos.items():
        clean, works = [], []
        for key, scans in by_model.items():
            if not all(kind in scans for kind, _ in parts):
                continue
            r = scans["ood/all"] if "ood/all" in scans else next(iter(scans.values()))
            found = [tests_of(scans[kind])[test] for kind, test in parts]
            p = min(1.0, len(found) * min(f[0] for f in found))
            named = min((f for f in found if f[1] is not None), key=lambda f: f[0], default=(1, None))[1]
            backdoor = r["target"] is not None and not r["control"]
            if not backdoor:
                clean.append((p, key))
            elif max(r["asr_seen"] or 0, r["asr_unseen"] or 0) >= WORKS:
                works.append((p, named == r["target"], key))
        fp = [k for p, k in clean if p <= alpha]
        truth = [0] * len(clean) + [1] * len(works)
        score = [-math.log10(max(p, 1e-300)) for p, *_ in clean + works]
        print(f"{name:30s} FPR {len(fp)}/{len(clean)}  TPR works {sum(p <= alpha for p, *_ in works)}/{len(works)}  "
              f"named {sum(n for _, n, _ in works)}/{len(works)}  AUROC {auroc(truth, score):.3f}  "
              f"smallest clean p {min(p for p, _ in clean):.3g}")
        print("    missed:", ", ".join(f"{k[0]} {k[1]} s{k[2]} ({p:.2g})" for p, _, k in works if p > alpha),
              "| false alarms:", ", ".join(f"{k[1]} s{k[2]}" for k in fp))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", nargs="?")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--kinds", default="ood/all")
    parser.add_argument("--analyse", nargs="+")
    parser.add_argument("--pairs", nargs="+")
    parser.add_argument("--clean-margins", action="store_true",
                        help="add each class's margin on the clean T images (model and backbone) to --out")
    args = parser.parse_args(argv)
    if args.pairs:
        pair_verdicts(args.pairs)
        return 0
    if args.analyse:
        analyse(args.analyse)
        return 0
    torch.set_num_threads(1)
    if args.clean_margins:
        add_clean_margins(args.store, args.out)
        return 0
    kinds = [ScanKind(*k.split("/")) for k in args.kinds.split(",")]
    measure(args.store, args.out, kinds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
