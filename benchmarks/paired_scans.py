"""The paired test of two scans against the Bonferroni rule and its variants, on `ci-bench run` stores.

    python benchmarks/paired_scans.py STORE [STORE ...] [--combine ood/all+task/base] [--alpha 0.05] [--show]

Every model of the stores with a calibrated scan of both kinds is judged by:

* bonferroni: the frozen two-scan verdict, min(1, 2 min p) over the scans' own p-values;
* paired: the shipped paired test (ci_core.scanning.combined.paired_verdict), the leave-one-out correlation;
* independent: the same sum of normal scores as if the scans were independent (correlation 0);
* mean: the mean of the two normal scores (correlation 1: valid whatever the correlation, and weakest);
* paired + first scan: the paired p and the first scan's p, Bonferroni over the two.

A scan that could not measure the model counts as flagged (fail closed) and ranks highest, naming the other scan's
top class where that one could measure it; AUROC is over -log10 p.  Development figures of docs/verdicts.md ("The same class in both scans") come from it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from ci_core.harness.report import parse_combination, scored_scans
from ci_core.harness.report.combined import ScanKind
from ci_core.harness.statistics import auroc, clopper_pearson, has_both_classes
from ci_core.harness.store import Store
from ci_core.learning.protocol import REFERENCE_SCORER
from ci_core.scanning.combined import bonferroni_verdict, naming_scan, paired_evidence
from ci_core.scanning.scan import UNSCANNABLE

WORKS = 0.5


def scan_pairs(store: Store, kinds, priors=None) -> dict[str, tuple]:
    """model key -> (its ``kinds[0]`` scan's row, its ``kinds[1]``'s) read by the calibrated scorer, with the variance
    prior book ``priors`` where given; models without both scans are left out."""
    _, rows = scored_scans(store, None, priors)
    scans: dict[str, dict] = {}
    for row in rows:
        if row.scorer == REFERENCE_SCORER and ScanKind.of(row.scan) in kinds:
            scans.setdefault(row.model.key, {})[ScanKind.of(row.scan)] = row
    return {key: (pair[kinds[0]], pair[kinds[1]]) for key, pair in scans.items() if len(pair) == 2}


def read_pair(first: dict, second: dict, correlation: float | None = None) -> tuple[float, str]:
    """(p, class named) of the paired test, its correlation estimated (None) or fixed."""
    evidence = paired_evidence(first, second, correlation=correlation)
    best = int(np.argmax(evidence.combined))
    return evidence.p_values[best], evidence.classes[best]


def judged(first, second, alpha: float = 0.05) -> dict[str, tuple[float, str | None]]:
    """Rule -> (p, class named) for one model's two scans (ScoredScan rows of the calibrated scorer); ``alpha`` only
    decides which scan names the class of a pair with an unscannable scan."""
    if UNSCANNABLE in (first.verdict, second.verdict):
        # Fail closed, as the report does: flagged and ranked highest, the class named as the report names it.
        pair = (first, second)
        p_values = [None if s.verdict == UNSCANNABLE else s.p_value for s in pair]
        named = naming_scan(bonferroni_verdict(p_values, alpha=alpha, label="pair"), p_values,
                            [s.suspect_p for s in pair])
        return {rule: (0.0, pair[named].predicted_target if named is not None else None) for rule in RULES}
    bonferroni = min((first.p_value, first.predicted_target), (second.p_value, second.predicted_target))
    paired = read_pair(first.class_p, second.class_p)
    return {
        "bonferroni (frozen two-scan verdict)": (min(1.0, 2 * bonferroni[0]), bonferroni[1]),
        "paired, leave-one-out correlation": paired,
        "paired as if independent": read_pair(first.class_p, second.class_p, 0.0),
        "mean of the two normal scores": read_pair(first.class_p, second.class_p, 1.0),
        "paired + first scan (x 2)": min((min(1.0, 2 * paired[0]), paired[1]),
                                         (min(1.0, 2 * first.p_value), first.predicted_target)),
    }


RULES = ("bonferroni (frozen two-scan verdict)", "paired, leave-one-out correlation", "paired as if independent",
         "mean of the two normal scores", "paired + first scan (x 2)")


def print_rules(models: list, alpha: float, show: bool, kind: str = "") -> None:
    """The rules' table (FPR with its interval, TPR and target named over the working backdoors, AUROC, the smallest
    clean p) over ``models``: (store name, model record, works, {rule: (p, class named)}); ``show`` adds each
    working backdoor's and each flagged clean model's p under every rule.  ``kind`` ends the headline."""
    clean = [m for m in models if m[1].target is None]
    working = [m for m in models if m[2]]
    print(f"{len(models)} models: {len(clean)} clean, {len(working)} whose trigger works (ASR seen or unseen >= "
          f"{WORKS}); alpha {alpha:g}{kind}\n")
    print("| rule | FPR (95% CI) | TPR works | target named | AUROC works | smallest clean p |\n|---|---|---|---|---|---|")
    for rule in models[0][3] if models else ():
        fp = sum(m[3][rule][0] <= alpha for m in clean)
        low, high = clopper_pearson(fp, len(clean)) if clean else (math.nan, math.nan)
        tp = sum(m[3][rule][0] <= alpha for m in working)
        named = sum(m[3][rule][1] == m[1].target for m in working)
        kept = clean + working
        truth = [m[1].target is not None for m in kept]
        score = [-math.log10(max(m[3][rule][0], 1e-300)) for m in kept]
        area = f"{auroc(truth, score):.3f}" if has_both_classes(truth) else "n/a"
        smallest = f"{min(m[3][rule][0] for m in clean):.2g}" if clean else "n/a"
        print(f"| {rule} | {fp}/{len(clean)} ({low:.3f}-{high:.3f}) | {tp}/{len(working)} | {named}/{len(working)} "
              f"| {area} | {smallest} |")
    if show:
        print()
        for store, model, works, by_rule in sorted(models, key=lambda m: (m[1].attack, m[1].dataset, m[1].seed)):
            if works or (model.target is None and min(p for p, _ in by_rule.values()) <= alpha):
                cells = "  ".join(f"{p:.2g} {named or '-'}" for p, named in by_rule.values())
                print(f"{store} {model.attack:17s} {model.dataset:17s} {model.seed:4d} target {model.target or '-'}: "
                      f"{cells}")


def parse_arguments(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, tuple]:
    """The arguments every rules' table takes (stores, --combine, --alpha, --show) beside ``parser``'s own, and the
    two scan kinds --combine names."""
    parser.add_argument("stores", type=Path, nargs="+")
    parser.add_argument("--combine", default="ood/all+task/base", help="the two scan kinds (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--show", action="store_true", help="print each working backdoor's and each flagged clean "
                                                            "model's p under every rule")
    args = parser.parse_args(argv)
    kinds = parse_combination(args.combine).kinds
    if len(kinds) != 2:
        parser.error(f"--combine {args.combine}: name exactly two scan kinds")
    return args, kinds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args, kinds = parse_arguments(parser, argv)
    # (store, model, works, rules)
    models = [(root.name, first.model, first.works(WORKS), judged(first, second, args.alpha))
              for root in args.stores for first, second in scan_pairs(Store.open(root), kinds).values()]
    print_rules(models, args.alpha, args.show)
    return 0


if __name__ == "__main__":
    sys.exit(main())
