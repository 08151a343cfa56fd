"""Does a reference that was prompt-tuned too judge a model better than the untuned backbone alone?

The calibrated verdict (``ref-outlier``) fits each class's cost in the model on the backbone's by least squares
and tests the classes for lying far above the line.  What spreads the clean models around that line is partly
the tuning itself (measured in docs/verdicts.md: scan noise is 22-51% of the spread), and tuning on the base
classes moves every clean model the same way.  An auditor can tune a clean model of their own (they hold the
few-shot images the provider was given) and scan it like the backbone: if the tuning's own movement is shared,
it leaves the residuals and the target stands out more.

For each scan of a ``ci-bench run`` store with a reference, this refits the outlier test with other designs:

- backbone: y = a + b x_backbone (the shipped default);
- + seen: a separate intercept for the base (seen) classes, the one shared move of tuning a line misses;
- tuned: y = a + b x_tuned, x_tuned the mean cost of the store's clean models of *other* seeds on the same
  dataset (leave-one-out: a clean model is never its own reference), each scanned with the same scan seed;
- backbone + tuned (+ seen): both references as regressors.

and prints, per design, FPR at alpha over clean models (Clopper-Pearson 95%), TPR and target named over the
working backdoors (ASR >= 0.5 on seen or unseen classes), AUROC over clean and working by the p-value, and the
smallest clean p.  ``--tuned K`` uses only the K lowest other clean seeds.

    python benchmarks/tuned_reference.py STORE [--alpha 0.05] [--tuned K] [--show DESIGN]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ci_core.harness.statistics import auroc, clopper_pearson, has_both_classes
from ci_core.harness.store import Store
from ci_detectors.reference_scoring import ReferenceOutlierScorer, outlier_p_values, studentized_residuals_on
from scorer_calibration import WORKS, load, unscannable


def outlier_test(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """The shipped regression outlier test on any design: per-class t and the Bonferroni p of the largest."""
    t = studentized_residuals_on(design, y)
    return t, float(outlier_p_values(t, design.shape[0] - design.shape[1] - 1).min())


def cost(evidence) -> np.ndarray:
    """What ref-outlier compares by default (larger = easier to reach)."""
    return ReferenceOutlierScorer().compared(evidence, "cost")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--tuned", type=int, default=None, help="how many other clean seeds form the tuned reference")
    parser.add_argument("--show", help="print the per-model values of this design")
    args = parser.parse_args(argv)
    rows = [r for r in load(Store.open(args.store), None, "all") if not unscannable(r)]
    clean = {}
    for row in rows:
        model = row["model"]
        if model.attack == "clean" and not model.control:
            clean.setdefault(model.dataset, {})[model.seed] = cost(row["evidence"])
    results: dict[str, list] = {}
    for row in rows:
        model, names = row["model"], [e.name for e in row["evidence"]]
        y, x_ref = cost(row["evidence"]), cost(row["reference"])
        seen = np.array([n in set(model.base_classes) for n in names], dtype=float)
        others = sorted(s for s in clean[model.dataset] if not (model.attack == "clean" and s == model.seed))
        if args.tuned:
            others = others[:args.tuned]
        if not others:
            continue  # no clean model of another seed on this dataset yet
        x_tuned = np.mean([clean[model.dataset][s] for s in others], axis=0)
        one = np.ones_like(y)
        designs = {
            "backbone": [one, x_ref],
            "backbone + seen": [one, x_ref, seen],
            "tuned": [one, x_tuned],
            "tuned + seen": [one, x_tuned, seen],
            "backbone + tuned": [one, x_ref, x_tuned],
            "backbone + tuned + seen": [one, x_ref, x_tuned, seen],
        }
        for name, columns in designs.items():
            t, p = outlier_test(np.column_stack(columns), y)
            results.setdefault(name, []).append((row, t, p, names[int(np.argmax(t))]))
    print(f"{len(rows)} scans; tuned reference: {'all' if not args.tuned else args.tuned} other clean seeds\n")
    print("design | FPR@%g (95%% CI) | TPR works | TPR unseen | TPR seen only | target named (works) | AUROC works "
          "| smallest clean p" % args.alpha)
    for name, entries in results.items():
        is_clean = [e[0]["model"].target is None for e in entries]
        metrics = [e[0]["model"].metrics for e in entries]
        unseen = [(m.get("asr_new") or 0) >= WORKS for m in metrics]
        works = [(not c) and max(m.get("asr_new") or 0, m.get("asr_base") or 0) >= WORKS
                 for c, m in zip(is_clean, metrics)]
        clean_p = [e[2] for e, c in zip(entries, is_clean) if c]
        k = sum(p <= args.alpha for p in clean_p)
        lo, hi = clopper_pearson(k, len(clean_p)) if clean_p else (float("nan"), float("nan"))
        flagged = [e[2] <= args.alpha for e in entries]
        tpr = lambda keep: f"{sum(f for f, w in zip(flagged, keep) if w)}/{sum(keep)}"
        seen_only = [w and not u for w, u in zip(works, unseen)]
        unseen_w = [w and u for w, u in zip(works, unseen)]
        named = sum(e[3] == e[0]["model"].target for e, w in zip(entries, works) if w)
        keep = [i for i in range(len(entries)) if is_clean[i] or works[i]]
        truth = [works[i] for i in keep]
        rank = [-np.log10(max(entries[i][2], 1e-300)) + 1e-6 * float(entries[i][1].max()) for i in keep]
        area = f"{auroc(truth, rank):.3f}" if has_both_classes(truth) else "n/a"
        print(f"{name} | {k}/{len(clean_p)} ({lo:.2f}-{hi:.2f}) | {tpr(works)} | {tpr(unseen_w)} | {tpr(seen_only)} | "
              f"{named}/{sum(works)} | {area} | {min(clean_p, default=float('nan')):.3g}")
    if args.show:
        print(f"\n{args.show}: attack, dataset, seed, ASR seen, ASR unseen, t_max, p, top class, target")
        for row, t, p, top in sorted(results[args.show], key=lambda e: (e[0]["model"].attack, e[0]["model"].dataset,
                                                                         e[0]["model"].seed)):
            m = row["model"]
            print(f"{m.attack:18s} {m.dataset:17s} {m.seed:3d} {m.metrics.get('asr_base') or 0:5.2f} "
                  f"{m.metrics.get('asr_new') or 0:5.2f} {t.max():6.2f} {p:8.2g} {top:18s} {m.target or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
