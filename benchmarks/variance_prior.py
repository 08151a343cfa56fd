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

from ci_core.harness.priors import book_from_scans
from ci_core.harness.report.scored import scorers, stored_scans
from ci_core.harness.store import Store
from ci_core.learning.protocol import REFERENCE_SCORER
from ci_core.scanning.variance_prior import PriorBook
from paired_scans import WORKS, judged, parse_arguments, print_rules, scan_pairs  # benchmarks/, beside this script

# The two rules of paired_scans.judged read with and without the prior.
RULES = {"bonferroni": "bonferroni (frozen two-scan verdict)", "paired": "paired, leave-one-out correlation"}


def two_rules(first, second, alpha: float) -> dict[str, tuple[float, str | None]]:
    """{'bonferroni': (p, class named), 'paired': (p, class named)} of one model's two scans."""
    every = judged(first, second, alpha)
    return {short: every[rule] for short, rule in RULES.items()}


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
        store = Store.open(root)
        own, moderated = scan_pairs(store, kinds), scan_pairs(store, kinds, book)
        for key, (first, second) in own.items():
            rules = {f"own spread, {rule}": value for rule, value in two_rules(first, second, args.alpha).items()}
            rules.update({f"variance prior, {rule}": value
                          for rule, value in two_rules(*moderated[key], args.alpha).items()})
            models.append((root.name, first.model, first.works(WORKS), rules))
    print_rules(models, args.alpha, args.show,
                kind=f"; prior {'from ' + str(args.book) if fixed else 'from the other stores'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
