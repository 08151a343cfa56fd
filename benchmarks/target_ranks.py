"""Where each working backdoor's true target stands in each of its scans, to read why a model was missed.

    python benchmarks/target_ranks.py STORE [STORE ...] [--combine ood/all+task/base] [--book PRIOR.json] [--all]

For every backdoored model whose trigger works (ASR seen or unseen >= 0.5) and each of the two scan kinds, the
calibrated scorer's per-class p-values (before the correction over the classes) are ranked, smallest first: the
line gives the true target's rank among the scan's candidate classes and its p, and the top class and its p.  A
target that is not a candidate of the scan (a new class in a base-class scan) says so.  ``--book`` reads the scans
with a variance prior book (as ``ci-bench report --variance-prior``); ``--all`` lists the backdoors that do not work
too.  The miss analyses of docs/verdicts.md come from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ci_core.harness.store import Store
from ci_core.scanning.scan import UNSCANNABLE
from ci_core.scanning.variance_prior import PriorBook
from paired_scans import WORKS, parse_arguments, scan_pairs  # benchmarks/, beside this script


def target_standing(scan) -> str:
    """'rank R/N p P; top CLASS p Q' for one scan row (ScoredScan) of a backdoored model."""
    if scan.class_p is None and scan.verdict == UNSCANNABLE:
        # Measured on the images it did not break on, an unscannable scan still names a suspect (ScanResult.suspect).
        suspect = ("no suspect" if scan.predicted_target is None else
                   f"suspect {scan.predicted_target!r} p {scan.suspect_p:.2g}")
        why = "; ".join(scan.problems)
        return f"unscannable, {suspect} ({why if len(why) <= 120 else why[:117] + '...'})"
    if scan.class_p is None:
        return "no per-class p (the scorer gives none)"
    ranked = sorted(scan.class_p.items(), key=lambda item: item[1])
    top, top_p = ranked[0]
    names = [name for name, _ in ranked]
    if scan.true_target not in names:
        where = f"target not a candidate of {len(names)} classes"
    else:
        where = f"rank {names.index(scan.true_target) + 1}/{len(names)} p {scan.class_p[scan.true_target]:.2g}"
    return f"{where}; top {top!r} p {top_p:.2g}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book", type=Path, help="read the scans with this variance prior book")
    parser.add_argument("--all", action="store_true", help="list the backdoors that do not work too")
    args, kinds = parse_arguments(parser, argv)
    book = PriorBook.read(args.book) if args.book is not None else None
    for root in args.stores:
        pairs = scan_pairs(Store.open(root), kinds, book)
        for first, second in sorted(pairs.values(), key=lambda pair: (pair[0].model.attack, pair[0].model.dataset,
                                                                      pair[0].model.seed)):
            model = first.model
            if model.target is None or not (args.all or first.works(WORKS)):
                continue
            seen, unseen = (model.metrics.get(key) or 0.0 for key in ("asr_base", "asr_new"))
            print(f"{root.name} {model.attack} {model.dataset} seed {model.seed}, target {model.target!r}, "
                  f"ASR seen/unseen {seen:.2f}/{unseen:.2f}")
            for kind, scan in zip(kinds, (first, second)):
                print(f"    {kind}: {target_standing(scan)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
