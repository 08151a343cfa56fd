"""The report's rows: every scan's stored evidence scored again, one ``ScoredScan`` per scan and scorer.

The scorers that apply to a scan are its detector's own (the paper's) and, where
the scan has a reference cell, the calibrated one against it.  A scan whose
model could not be measured (non-finite outputs, collapsed class scores or
out-of-range contexts on the pool) is ``unscannable``: it counts as flagged by
every scorer, ranked above every score (fail closed).  Where such a scan still
measured every class on the images the model did not break on, the scorer's
reading of that evidence names the class (``predicted_target``, ``suspect_p``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import attrs

from ci_core.errors import ConfigError, DataError
from ci_core.harness.cells import read_reference
from ci_core.harness.plan import CLEAN_ATTACK
from ci_core.harness.priors import scan_setting
from ci_core.harness.records import ModelRecord, ScanRecord
from ci_core.harness.store import Store
from ci_core.interfaces import to_json
from ci_core.plugins import registry
from ci_core.learning.protocol import REFERENCE_SCORER
from ci_core.scanning.scan import UNSCANNABLE, apply_scorer
from ci_core.scanning.seen import mark_seen
from ci_core.scanning.scan_report import REPORT_FILE, read_scan_report
from ci_core.scanning.variance_prior import PriorBook, with_prior


@attrs.frozen(kw_only=True, eq=False)
class ScoredScan:
    """One scan read by one scorer."""

    scan: ScanRecord
    model: ModelRecord
    classes: list[dict]  # the scan report's per-class evidence (name, asr, loss, statistic, ssim, seconds, loss_trace)
    scorer: str
    scorer_config: dict
    problems: tuple[str, ...]  # why the model could not be measured (empty when it could)
    verdict: str
    backdoored: bool
    s_max: float
    p_value: float | None
    predicted_target: str | None
    flagged: tuple[str, ...]
    rule: str | None
    combined: str | None = None  # the scan kinds a combined verdict judged the model by (report --combine)
    # Each class's p-value before the scorer's correction over the classes (where the scorer gives one): what the
    # paired test of two scans reads (ci_core.scanning.combined.paired_verdict).
    class_p: Mapping[str, float] | None = None
    # Unscannable, yet every class measured on the images the model gave finite logits on: the scorer's p of the
    # class it then names (predicted_target).  Never a p-value of the verdict, which stays fail closed.
    suspect_p: float | None = None

    @property
    def key(self) -> str:
        return self.scan.key

    @property
    def scorer_setting(self) -> dict:
        """The scorer's config without its variance prior, which belongs to each scan's setting (one per dataset and
        scan kind): rows read with their own priors still group, and combine, as one scorer setting."""
        return {k: v for k, v in self.scorer_config.items() if k != "variance_prior"}

    @property
    def true_target(self) -> str | None:
        return self.scan.true_target

    @property
    def detector(self) -> str:
        return self.scan.detector

    @property
    def dataset(self) -> str:
        return self.scan.dataset

    @property
    def attack(self) -> str:
        return self.scan.attack

    @property
    def variant(self) -> dict:
        return self.scan.variant

    def implanted(self, level: float) -> bool:
        """A backdoored model whose attack reached ``level`` ASR on unseen classes."""
        return self.true_target is not None and (self.model.metrics.get("asr_new") or 0.0) >= level

    def works(self, level: float) -> bool:
        """A backdoored model whose trigger reaches ``level`` ASR on the seen or on the unseen classes: backdoored
        where it matters to an auditor, since the seen classes are the ones the organisation deploys."""
        metrics = self.model.metrics
        return self.true_target is not None and max(metrics.get("asr_base") or 0.0,
                                                    metrics.get("asr_new") or 0.0) >= level


def scorers(options: dict[str, dict] | None) -> dict[str, Any]:
    """Scorer name -> instance with its default config, overridden by ``options`` (checked by name)."""
    plugins = registry()
    options = dict(options or {})
    for name in options:
        plugins.get("scorer", name)  # an unknown scorer fails here, naming the registered ones
    return {name: plugins.get("scorer", name).from_options(options.get(name)) for name in plugins.names("scorer")}


@attrs.frozen(kw_only=True, eq=False)
class StoredScan:
    """One scan of a store as the report reads it: its records, its evidence (seen flags marked), its reference
    scan (None: none) and why the model could not be measured (empty when it could)."""

    scan: ScanRecord
    model: ModelRecord
    evidence: tuple
    reference: Any
    problems: tuple[str, ...]


def stored_scans(store: Store) -> tuple[list[ModelRecord], list[StoredScan]]:
    """(model records, every scan of the store with its evidence and reference), each file checked as it is read."""
    models = {record.key: record for record in store.cells("model")}
    references: dict[str, Any] = {record.key: None for record in store.cells("reference")}
    found = []
    for scan in store.cells("scan"):
        model = models.get(scan.model)
        if model is None:
            raise ConfigError(f"{store.cell_dir('scan', scan.key)}: its model cell {scan.model} is not in the store")
        report_path = store.scan_folder(scan.key) / REPORT_FILE
        try:
            report = read_scan_report(report_path)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        evidence = mark_seen(report.evidence(), model.base_classes or None)  # older reports: the bundle says
        reference = None
        if scan.reference:
            if scan.reference not in references:
                raise ConfigError(f"{store.cell_dir('scan', scan.key)}: its reference cell {scan.reference} is not "
                                  "in the store")
            if references[scan.reference] is None:
                references[scan.reference] = read_reference(store, scan.reference)
            reference = references[scan.reference]
        problems = report.unscannable_reasons
        if not problems and reference is not None:
            problems = report.pool_health.problems(reference.health)
        found.append(StoredScan(scan=scan, model=model, evidence=evidence, reference=reference,
                                problems=tuple(problems)))
    return list(models.values()), found


def scored_scans(store: Store, scorer_options: dict[str, dict] | None = None,
                 priors: PriorBook | None = None) -> tuple[list[ModelRecord], list[ScoredScan]]:
    """(model records, one ScoredScan per scan and scorer that applies to it).  With ``priors`` the calibrated
    scorer reads each scan with its setting's variance prior (a setting the book lacks is an error)."""
    by_name = scorers(scorer_options)
    plugins = registry()
    models, scans = stored_scans(store)
    rows = []
    for stored in scans:
        scan, evidence, reference, problems = stored.scan, stored.evidence, stored.reference, stored.problems
        classes = [to_json(e) for e in evidence]
        own = plugins.get("detector", scan.detector).default_scorer
        for name in ([REFERENCE_SCORER] if reference is not None else []) + [own]:
            scorer = by_name[name]
            if priors is not None and name == REFERENCE_SCORER:
                scorer = with_prior(scorer, priors.lookup(scan_setting(scan, reference, scorer)))
            common = dict(scan=scan, model=stored.model, classes=classes, scorer=name,
                          scorer_config=to_json(scorer.config), problems=problems)
            # Scored where measured: a scannable scan, or an unscannable one that measured every class on the images
            # the model did not break on.
            measured = not problems or len(evidence) == scan.n_classes
            scores = (apply_scorer(scorer, evidence, reference.classes if reference is not None else None).scores
                      if measured else None)
            if problems:  # fail closed; a complete measurement still names its class
                rows.append(ScoredScan(**common, verdict=UNSCANNABLE, backdoored=True, s_max=math.inf, p_value=None,
                                       predicted_target=scores.target if scores is not None else None, flagged=(),
                                       rule=None, suspect_p=scores.p_value if scores is not None else None))
                continue
            class_p = scores.per_class.get("p_class")
            rows.append(ScoredScan(**common, verdict="backdoored" if scores.backdoored else "clean",
                                   backdoored=scores.backdoored, s_max=scores.s_max, p_value=scores.p_value,
                                   predicted_target=scores.target, flagged=scores.flagged, rule=scores.rule,
                                   class_p=None if class_p is None else dict(zip((e.name for e in evidence),
                                                                                 map(float, class_p)))))
    return models, rows


def pending(store: Store, failed_keys: set[str]) -> list[dict]:
    """Cells the store's plans hold that have no result, did not fail and were not declined."""
    seen, found = set(), []
    for plan in store.plans():
        for cell in plan.get("cells", []):
            key = cell["key"]
            if key in seen:
                continue
            seen.add(key)
            if not store.is_done(cell["kind"], key) and key not in failed_keys and not store.is_declined(key):
                found.append(cell)
    return found


def skipped_repairs(store: Store) -> list[dict]:
    """The repairs left out, and why, merged over plans: those the plans left out (known before anything ran) and
    the repair cells declined when they ran (their scan could not measure the model), per model."""
    merged: dict[tuple[str, str], list[str]] = {}
    for plan in store.plans():
        for skipped in plan.get("skipped_repairs", []):
            names = merged.setdefault((skipped["attack"], skipped["reason"]), [])
            names.extend(n for n in skipped["repairers"] if n not in names)
    for declined in store.declines():
        if declined.get("kind") != "repair":
            continue
        spec = declined.get("spec", {})
        try:
            model = store.read_cell("model", str(spec.get("model", "")))
        except (ConfigError, OSError):
            continue  # its model is gone from the store: nothing to report it against
        reason = f"{model.attack}/{model.dataset}/seed {model.seed}: {declined.get('reason')}"
        names = merged.setdefault((model.attack, reason), [])
        if spec.get("repairer") not in names:
            names.append(spec.get("repairer"))
    order = sorted(merged, key=lambda item: (item[0] != CLEAN_ATTACK, item))  # clean first, as in the tables
    return [{"attack": attack, "repairers": merged[(attack, reason)], "reason": reason} for attack, reason in order]
