"""The two-scan verdict with and without a variance prior, each store's models read with a prior fitted on the
clean models of the *other* stores (so no clean model is ever in its own prior), or on a given book.

    python benchmarks/variance_prior.py STORE STORE [STORE ...] [--combine ood/all+task/base] [--alpha 0.05] [--show]
    python benchmarks/variance_prior.py STORE [STORE ...] --book PRIOR.json   # a confirmation: the frozen book

Rules side by side: each scan's own spread (the default) and the variance prior, each combined over the two scans
by Bonferroni and by the paired test.  A scan that could not measure the model counts as flagged (fail closed).
The development figures of docs/verdicts.md ("A tuned null for the residual spread") come from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ci_core.harness.priors import book_from_scans
from ci_core.harness.report import scored_scans
from ci_core.harness.report.combined import ScanKind
from ci_core.harness.report.scored import scorers, stored_scans
from ci_core.harness.store import Store
from ci_core.learning.protocol import REFERENCE_SCORER
from ci_core.scanning.combined import paired_evidence
from ci_core.scanning.scan import UNSCANNABLE
from ci_core.scanning.variance_prior import PriorBook
from paired_scans import WORKS, parse_arguments, print_rules  # benchmarks/, beside this script


def pairs(store: Store, kinds, priors) -> dict[str, tuple]:
    """model key -> (first scan's row, second's) of the calibrated scorer, read with ``priors`` (None: none)."""
    _, rows = scored_scans(store, None, priors)
    scans: dict[str, dict] = {}
    for row in rows:
        if row.scorer == REFERENCE_SCORER and ScanKind.of(row.scan) in kinds:
            scans.setdefault(row.model.key, {})[ScanKind.of(row.scan)] = row
    return {key: (pair[kinds[0]], pair[kinds[1]]) for key, pair in scans.items() if len(pair) == 2}


def judged(first, second) -> dict[str, tuple[float, str | None]]:
    """{'bonferroni': (p, class named), 'paired': (p, class named)} of one model's two scans."""
    if UNSCANNABLE in (first.verdict, second.verdict):
        measured = [s for s in (first, second) if s.verdict != UNSCANNABLE]
        named = measured[0].predicted_target if measured else None
        return {"bonferroni": (0.0, named), "paired": (0.0, named)}
    best = min((first.p_value, first.predicted_target), (second.p_value, second.predicted_target))
    evidence = paired_evidence(first.class_p, second.class_p)
    top = int(np.argmax(evidence.combined))
    return {"bonferroni": (min(1.0, 2 * best[0]), best[1]), "paired": (evidence.p_values[top], evidence.classes[top])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book", type=Path, help="read every store with this prior book (ci-bench prior) instead "
                                                  "of one fitted on the other stores")
    args, kinds = parse_arguments(parser, argv)
    if args.book is None and len(args.stores) < 2:
        parser.error("give two or more stores (each read with a prior fitted on the others), or --book")
    scorer = scorers(None)[REFERENCE_SCORER]
    stored = {root: stored_scans(Store.open(root))[1] for root in args.stores}
    fixed = PriorBook.read(args.book) if args.book is not None else None
    models = []  # (store name, model record, works, {rule: (p, named)})
    for root in args.stores:
        book = fixed or book_from_scans([s for other, rows in stored.items() if other != root for s in rows],
                                        scorer)[0]
        own, moderated = pairs(Store.open(root), kinds, None), pairs(Store.open(root), kinds, book)
        for key, (first, second) in own.items():
            rules = {f"own spread, {rule}": value for rule, value in judged(first, second).items()}
            rules.update({f"variance prior, {rule}": value for rule, value in judged(*moderated[key]).items()})
            models.append((root.name, first.model, first.works(WORKS), rules))
    print_rules(models, args.alpha, args.show,
                kind=f"; prior {'from ' + str(args.book) if fixed else 'from the other stores'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
