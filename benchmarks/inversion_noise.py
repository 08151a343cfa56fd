"""How much of the per-class evidence is inversion noise: the same models scanned with two scan seeds.

For every model of a ``ci-bench run`` store that has ci scans at two or more
scan seeds (``--scan-seed``), and for their references, this compares the
per-class values of each statistic between the seeds.  The noise of one
inversion is sd(A - B) / sqrt(2) over the classes; it is printed beside the
spread of the regression residuals the ``ref-outlier`` test divides by
(model on reference, one seed).  Where the noise is most of that spread,
averaging inversions shrinks the spread and lifts a true outlier's t; where it
is a small part, the spread is the model's own and restarts cannot help.
For backdoored models it prints the true target's studentised residual at
each seed.

    python benchmarks/inversion_noise.py STORE
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from ci_core.harness.cells import read_reference, stored_evidence
from ci_core.harness.store import Store
from ci_detectors.reference_scoring import studentized_residuals

STATISTICS = {
    "-loss": lambda rows: -np.array([r.loss for r in rows]),
    "margin": lambda rows: np.array([r.margin if r.margin is not None else np.nan for r in rows]),
    "ASR": lambda rows: np.array([r.asr for r in rows]),
}


def _residual_sd(y: np.ndarray, x: np.ndarray) -> float:
    slope, intercept = np.polyfit(x, y, 1)
    return float(np.std(y - (intercept + slope * x), ddof=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    args = parser.parse_args(argv)
    store = Store.open(args.store)
    models = {c.key: c for c in store.cells("model")}
    by_model: dict[str, dict[int, object]] = defaultdict(dict)
    for cell in store.cells("scan"):
        if cell.reference and cell.detector == "ci":
            by_model[cell.model][cell.spec.seed] = cell
    pairs = {key: seeds for key, seeds in by_model.items() if len(seeds) >= 2}
    if not pairs:
        print("no model has ci scans at two scan seeds; run the sweep again with another --scan-seed", file=sys.stderr)
        return 1
    references: dict[str, object] = {}

    def reference(key):
        if key not in references:
            references[key] = read_reference(store, key).classes
        return references[key]

    print("statistic | who | noise sd of one inversion | residual sd (model on reference) | noise / residual | "
          "class correlation between seeds")
    summary: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
    target_rows = []
    for key, seeds in sorted(pairs.items(), key=lambda kv: models[kv[0]].label):
        model = models[key]
        for (seed_a, cell_a), (seed_b, cell_b) in itertools.combinations(sorted(seeds.items()), 2):
            ev_a = stored_evidence(store.scan_folder(cell_a.key) / "report.json")
            ev_b = stored_evidence(store.scan_folder(cell_b.key) / "report.json")
            ref_a, ref_b = reference(cell_a.reference), reference(cell_b.reference)
            who = "clean" if model.target is None else "backdoored"
            t_of = {}
            for name, statistic in STATISTICS.items():
                a, b, ra, rb = statistic(ev_a), statistic(ev_b), statistic(ref_a), statistic(ref_b)
                if np.isnan(a).any() or np.isnan(ra).any():
                    continue
                noise = float(np.std(a - b, ddof=1) / np.sqrt(2))
                ref_noise = float(np.std(ra - rb, ddof=1) / np.sqrt(2))
                residual = _residual_sd(a, ra)
                summary[(name, who)].append((noise, residual, float(np.corrcoef(a, b)[0, 1])))
                summary[(name, "reference")].append((ref_noise, residual, float(np.corrcoef(ra, rb)[0, 1])))
                t_of[name] = (studentized_residuals(ra, a), studentized_residuals(rb, b),
                              studentized_residuals((ra + rb) / 2, (a + b) / 2))
            if model.target is not None:
                names = [e.name for e in ev_a]
                index = names.index(model.target)
                target_rows.append((model, seed_a, seed_b, {n: tuple(float(t[index]) for t in ts)
                                                            for n, ts in t_of.items()},
                                    {n: tuple(int((t > t[index]).sum()) + 1 for t in ts) for n, ts in t_of.items()}))
    for (name, who), values in sorted(summary.items()):
        noise, residual, corr = (np.median([v[i] for v in values]) for i in range(3))
        print(f"{name} | {who} ({len(values)}) | {noise:.4f} | {residual:.4f} | {noise / residual:.2f} | {corr:.3f}")
    if target_rows:
        print("\nbackdoored models: the true target's studentised residual (rank) at seed A, seed B, and with the "
              "two seeds' values averaged (model and reference)")
        for model, seed_a, seed_b, ts, ranks in target_rows:
            metrics = model.metrics
            shown = "; ".join(f"{n} {t[0]:.2f} ({r[0]}) / {t[1]:.2f} ({r[1]}) / avg {t[2]:.2f} ({r[2]})"
                              for (n, t), r in zip(ts.items(), ranks.values()))
            print(f"{model.label} (ASR seen {metrics.get('asr_base') or 0:.2f}, unseen {metrics.get('asr_new') or 0:.2f}),"
                  f" seeds {seed_a}/{seed_b}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
