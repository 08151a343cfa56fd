"""Running one cell: train a model, scan one (or its backbone, for a reference) or repair one, and file the result.

``execute`` is what every executor calls, in-process or as a Ray task.  It
takes plain JSON (the cell) and returns plain JSON (the outcome), never raises
for a failing cell (the error is filed under ``failed/`` and returned), and
seeds everything from the cell's seed, so a cell gives the same result in any
process and in any order.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs
import torch

from ci_core.harness.plan import Cell, FloorCell, ModelCell, ReferenceCell, RepairCell, ScanCell, cell_from_json
from ci_core.harness.records import FloorRecord, ModelRecord, PoolSpec, ReferenceRecord, RepairRecord, ScanRecord
from ci_core.harness.store import CELL_FILE, REFERENCE_FILE, SCAN_FOLDER, Store, read_json, write_json
from ci_core.data.labeled import LabeledImages
from ci_core.data.ood import OODPool, load_pool
from ci_core.errors import ConfigError, DataError, NotApplicable
from ci_core.learning.evaluation import evaluate
from ci_core.interfaces import ClassEvidence, Progress, to_json
from ci_core.models.backbone import Backbone, load_backbone
from ci_core.models.bundle import bundle_sha256, load_bundle, read_meta, save_bundle
from ci_core.plugins import open_dataset, registry
from ci_core.scanning.reference import (InvalidReference, ReferenceCache, ReferenceScan, default_cache_dir,
                                        reference_from_json, run_reference)
from ci_core.runtime import StderrProgress, resolve_device, seed_everything, torch_threads
from ci_core.scanning.scan_triggers import ScanTriggers, UnscannableScan, check_same_bundle, choose_trigger
from ci_core.scanning.scan import apply_scorer, scan, stored_problems
from ci_core.scanning.seen import mark_seen
from ci_core.pages.scan_output import write_scan
from ci_core.scanning.scan_report import BackboneIdentity, BundleIdentity, ScanContext, read_scan_report
from ci_core.plugins import load_trigger
from ci_core.learning.protocol import (MODEL_BUNDLE, choose_scorers, choose_target, load_task, preset_for,
                                       sample_candidates, train_and_save)


@functools.lru_cache(maxsize=2)
def cached_backbone(name: str, source: str, device: str) -> Backbone:
    """The backbone NAME from SOURCE on DEVICE, loaded once per process (a sweep and its benchmarks reuse it)."""
    return load_backbone(name, source, device=device)


def cell_backbone(cell: Cell, device: str) -> Backbone:
    """The backbone a cell was planned for, checked against the weights hash in its key."""
    ident = cell.spec.backbone
    backbone = cached_backbone(ident.name, cell.backbone_source, device)
    if backbone.weights_sha256 != ident.weights_sha256:
        raise ConfigError(f"backbone {ident.name} from {cell.backbone_source!r} has weights sha256 "
                          f"{backbone.weights_sha256[:16]}..., but the sweep was planned with "
                          f"{ident.weights_sha256[:16]}...")
    return backbone


@functools.lru_cache(maxsize=2)
def _ood_pool(source: str, inversion: int, holdout: int, image_size: int, seed: int) -> OODPool:
    return load_pool(source, inversion=inversion, holdout=holdout, image_size=image_size, seed=seed)


def inversion_pool(pool: PoolSpec, dataset_name: str | None, data_root: str | None, image_size: int,
                   seed: int, classes: Sequence[str] | None = None) -> OODPool:
    """D and T of a scan, by ``pool.inversion_data``:

    - 'ood': both from the OOD pool (the paper's setting);
    - 'id': D is the dataset's validation images of every class, unlabelled, shuffled by ``seed`` (the paper's
      Table 17); T stays the OOD held-out set, which keeps the two settings' ASR comparable;
    - 'id-only': D and T are both the dataset's validation images (disjoint), as an auditor who scans with images
      of their own task only.  A model that breaks on images unlike its training set (the tripwire) cannot be
      measured on any OOD T; this asks whether it can be on its own task's images (on the tiny world the
      tripwire breaks on 1-2% of those too: docs/verdicts.md).
    - 'task': D and T are the dataset's images of the scanned ``classes`` only, D from the train split and T from
      the validation split: an auditor who checks the classes it deploys with labelled images of them.  A
      backdoor that works on the base classes only moves images *among the base classes*; among every class, or
      on images of other classes, it may not show (docs/verdicts.md).
    """
    # A folder source is identified by its path and a fingerprint of its files; the pool reads the path.
    source = pool.source.split("#sha256:", 1)[0]
    if pool.inversion_data == "ood":
        return _ood_pool(source, pool.inversion, pool.holdout, image_size, seed)
    if pool.inversion_data == "task":
        return _task_pool(pool, dataset_name, data_root, image_size, seed, classes)
    own_holdout = pool.inversion_data == "id-only"
    wanted = pool.inversion + (pool.holdout if own_holdout else 0)
    dataset = open_dataset(dataset_name, data_root)
    images = dataset.load("val", image_size=image_size, seed=seed,
                          shots=math.ceil(wanted / len(dataset.classnames))).images
    if len(images) < wanted:
        needed = f"D ({pool.inversion})" + (f" and T ({pool.holdout})" if own_holdout else "")
        raise DataError(f"{dataset_name}: its validation split holds {len(images)} images, {wanted} are needed for "
                        f"{needed}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    inversion = images[order[:pool.inversion]]
    if own_holdout:
        return OODPool(inversion=inversion, holdout=images[order[pool.inversion:wanted]],
                       source=f"{dataset_name} validation images (in-distribution, D and T)")
    ood = _ood_pool(source, pool.inversion, pool.holdout, image_size, seed)
    return OODPool(inversion=inversion, holdout=ood.holdout, source=f"{dataset_name} validation images "
                   f"(in-distribution); held-out {ood.source}", skipped=ood.skipped, files_found=ood.files_found)


def _task_pool(pool: PoolSpec, dataset_name: str | None, data_root: str | None, image_size: int, seed: int,
               classes: Sequence[str] | None) -> OODPool:
    if not classes:
        raise ConfigError("inversion data 'task' needs the scan's classes: its images are of those classes only")
    dataset = open_dataset(dataset_name, data_root)
    unknown = [c for c in classes if c not in dataset.classnames]
    if unknown:
        raise ConfigError(f"{dataset_name}: the scan's classes {unknown} are not among its classes")
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for split, wanted in (("train", pool.inversion), ("val", pool.holdout)):
        images = dataset.load(split, image_size=image_size, seed=seed,
                              shots=math.ceil(wanted / len(classes))).restrict(tuple(classes)).images
        if len(images) < wanted:
            which = "D" if split == "train" else "T"
            raise DataError(f"{dataset_name}: its {split} split holds {len(images)} images of the {len(classes)} "
                            f"scanned classes, {wanted} are needed for {which}")
        drawn.append(images[torch.randperm(len(images), generator=generator)[:wanted]])
    return OODPool(inversion=drawn[0], holdout=drawn[1],
                   source=f"{dataset_name} images of the {len(classes)} scanned classes (D train, T validation)")


class _Cost:
    """Wall and CPU seconds of a cell (CPU seconds of this process: a cost that a busy machine does not inflate)."""

    def __init__(self, device: str):
        self.clock, self.cpu, self.device = time.perf_counter(), time.process_time(), device

    def fields(self) -> dict:
        return {"seconds": time.perf_counter() - self.clock, "cpu_seconds": time.process_time() - self.cpu,
                "device": self.device, "threads": torch.get_num_threads()}


def _file(work: Path, record) -> dict:
    data = record.to_json()
    write_json(work / CELL_FILE, data)
    return data


def run_model_cell(store: Store, cell: ModelCell, *, device: str, progress: Progress) -> dict:
    spec = cell.spec
    plugins = registry()
    backbone = cell_backbone(cell, device)
    attack = plugins.get("attack", spec.attack).from_options(spec.attack_config)
    with store.writing("model", cell.key) as work:
        cost = _Cost(device)
        dataset = plugins.get("dataset", spec.dataset).open(cell.data_root)
        task = load_task(dataset, backbone, seed=spec.seed, shots=spec.shots, test_per_class=spec.test_per_class,
                         progress=progress)
        # A control gets the target too (its attack's code wants one) and poisons nothing with it.
        target = choose_target(task, spec.seed) if spec.backdoor or spec.control else None
        trained = train_and_save(attack, backbone, task, work, target=target, seed=spec.seed, progress=progress)
        summary = trained.record()
        return _file(work, ModelRecord(
            key=cell.key, label=cell.label, spec=spec, dataset=spec.dataset, attack=spec.attack, seed=spec.seed,
            **{**summary, "target": None if spec.control else target}, control=spec.control,
            control_target=target if spec.control else None,
            base_classes=list(task.base), new_classes=list(task.new), **cost.fields()))


def run_reference_cell(store: Store, cell: ReferenceCell, *, device: str, progress: Progress) -> dict:
    spec = cell.spec
    backbone = cell_backbone(cell, device)
    detector = registry().get("detector", spec.detector).from_options(spec.detector_config)
    with store.writing("reference", cell.key) as work:
        cost = _Cost(device)
        pool = inversion_pool(spec.pool, cell.dataset, cell.data_root, backbone.image_size, spec.seed, spec.classnames)
        # The same cache as ci-scan's (one key: reference_spec's hash): a reference any command computed on this
        # machine is read, not computed again; the cell keeps its own copy, so a store stands alone.
        reference = run_reference(backbone, spec.template, detector, pool, spec.classnames, seed=spec.seed,
                                  cache=ReferenceCache(default_cache_dir()), progress=progress)
        write_json(work / REFERENCE_FILE, reference.to_json())
        return _file(work, ReferenceRecord(
            key=cell.key, label=cell.label, spec=spec, reference_key=reference.key, pool_sha256=pool.digest(),
            detector=spec.detector, n_classes=len(reference.classes), scan_seconds=reference.seconds,
            **cost.fields()))


def read_reference(store: Store, key: str) -> ReferenceScan:
    """A reference cell's scan, checked against the spec it was computed for (``ci_core.scanning.reference``)."""
    path = store.reference_file(key)
    data = read_json(path, "reference scan")
    spec = data.get("spec")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: its reference scan has no spec")
    try:
        return reference_from_json(data, spec, str(path))
    except InvalidReference as exc:
        raise ConfigError(str(exc)) from None


def _require(store: Store, kind: str, key: str | None) -> None:
    if key is not None and not store.is_done(kind, key):
        raise ConfigError(f"its {kind} cell {key} has no result in the store")


def run_scan_cell(store: Store, cell: ScanCell, *, device: str, progress: Progress) -> dict:
    spec = cell.spec
    _require(store, "model", cell.model_key)
    _require(store, "reference", cell.reference_key)
    reference = read_reference(store, cell.reference_key) if cell.reference_key is not None else None
    model_record = store.read_cell("model", cell.model_key)
    plugins = registry()
    backbone = cell_backbone(cell, device)
    detector = plugins.get("detector", spec.detector).from_options(spec.detector_config)
    decider, also = choose_scorers(plugins, plugins.get("detector", spec.detector), configs=cell.scoring,
                                   reference=reference is not None)
    with store.writing("scan", cell.key) as work:
        cost = _Cost(device)
        model, meta = load_bundle(store.bundle_path("model", cell.model_key), backbone)
        # The paper's benchmark candidates (section 4.2): a seeded sample of the classes, the target among them;
        # or of the base classes the model was tuned on.
        base = meta.get("base_classes") or ()
        if spec.classes == "base" and not base:
            raise ConfigError(f"model cell {cell.model_key}: its bundle records no base classes to scan")
        pool_of = base if spec.classes == "base" else meta["classnames"]
        candidates = sample_candidates(pool_of, seed=spec.seed, target=model_record.target, count=spec.candidates)
        pool = inversion_pool(spec.pool, model_record.dataset, cell.data_root, backbone.image_size, spec.seed,
                              candidates)
        if reference is not None:
            check_reference_fits(reference, candidates, pool, meta["template"], cell.reference_key)
        result = scan(model, detector, decider, pool, candidates, seed=spec.seed, reference=reference, also=also,
                      known_problems=stored_problems(meta), base_classes=meta.get("base_classes"), progress=progress)
        write_scan(result, work / SCAN_FOLDER, pool, ScanContext(
            bundle=BundleIdentity(path=None, model_cell=cell.model_key, sha256=meta["sha256"]),
            backbone=BackboneIdentity.of(backbone.identity()), seed=spec.seed, preset=preset_for(backbone), device=device,
            command=None))
        return _file(work, ScanRecord(
            key=cell.key, label=cell.label, spec=spec, model=cell.model_key, reference=cell.reference_key,
            dataset=model_record.dataset, attack=model_record.attack, seed=model_record.seed,
            control=model_record.control, true_target=model_record.target, detector=spec.detector,
            variant=cell.variant, pool_sha256=pool.digest(), n_classes=len(candidates), scan_seconds=result.seconds,
            # the verdict with the plan's scorers; `ci-bench report` scores the stored evidence again
            scoring=cell.scoring, **result.summary(), **cost.fields()))


def check_reference_fits(reference: ReferenceScan, classnames, pool: OODPool, template: str, key: str) -> None:
    """The reference must have been computed on exactly this scan's classes, pool images and template."""
    spec = reference.spec
    if tuple(reference.classnames) != tuple(classnames):
        raise ConfigError(f"reference cell {key} covers other classes than the scan")
    if spec["template"] != template:
        raise ConfigError(f"reference cell {key} used template {spec['template']!r}; the bundle records {template!r}")
    if spec["pool"].get("sha256") != pool.digest():
        raise ConfigError(f"reference cell {key} was computed on other OOD images than the scan's (pool sha256 "
                          f"{str(spec['pool'].get('sha256'))[:16]}... against {pool.digest()[:16]}...)")


def repair_set(train: LabeledImages, shots: int, seed: int) -> LabeledImages:
    """The defender's labelled clean set: ``shots`` images per class of ``train``, drawn by ``seed``.

    The paper's defender holds "a subset of the data used for prompt tuning";
    a class with fewer images keeps them all.
    """
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label in range(len(train.classnames)):
        members = (train.labels == label).nonzero().flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    chosen = torch.cat(keep).sort().values
    return LabeledImages(train.images[chosen], train.labels[chosen], train.classnames)


def _backdoored_model(store: Store, key: str) -> ModelRecord:
    """The record of model cell ``key``, which must be backdoored: a target and a stored ground-truth trigger."""
    record = store.read_cell("model", key)
    if record.target is None or not store.trigger_path(key).is_file():
        raise ConfigError(f"its model cell {key} has no backdoor (no target and trigger) to measure ASR with")
    return record


def _model_task(record: ModelRecord, data_root: str | None, backbone: Backbone, progress: Progress):
    """The model cell's own task: the same few-shot training and test images it was trained and evaluated on."""
    spec = record.spec
    dataset = registry().get("dataset", record.dataset).open(data_root)
    return load_task(dataset, backbone, seed=spec.seed, shots=spec.shots, test_per_class=spec.test_per_class,
                     progress=progress)


def run_repair_cell(store: Store, cell: RepairCell, *, device: str, progress: Progress) -> dict:
    spec = cell.spec
    _require(store, "model", cell.model_key)
    _require(store, "scan", cell.scan_key)
    model_record = _backdoored_model(store, cell.model_key)
    target = model_record.target
    plugins = registry()
    backbone = cell_backbone(cell, device)
    repairer = plugins.get("repairer", spec.repairer).from_options(spec.repairer_config)
    bundle = store.bundle_path("model", cell.model_key)
    kind = read_meta(bundle)["kind"]
    if kind not in repairer.bundle_kinds:
        raise ConfigError(f"{bundle} is a {kind!r} bundle, which {repairer.name} cannot repair")
    try:
        triggers = rescored_triggers(store, cell)
    except UnscannableScan as exc:
        raise NotApplicable(f"its scan could not measure the model ({'; '.join(exc.reasons)}), "
                            "so there is no reconstructed trigger to repair with") from None
    check_same_bundle(triggers, bundle)
    with store.writing("repair", cell.key) as work:
        cost = _Cost(device)
        model, meta = load_bundle(bundle, backbone)
        truth = load_trigger(store.trigger_path(cell.model_key))
        # The same training and test images as the model cell, so that "before" and "after" compare.
        task = _model_task(model_record, cell.data_root, backbone, progress)
        clean = repair_set(task.train, spec.repair_shots, spec.seed)
        picked = choose_trigger(repairer, triggers)
        repair_cost = _Cost(device)
        repaired = repairer.repair(model=model, trigger=picked.trigger if picked is not None else None,
                                   target=picked.name if picked is not None else triggers.target, clean=clean,
                                   seed=spec.seed, progress=progress)
        repair_seconds = repair_cost.fields()
        after = evaluate(repaired, task.test, task.base, task.new, truth, target)
        saved = save_bundle(repaired, meta["classnames"], work / MODEL_BUNDLE, base_classes=meta.get("base_classes"),
                            template=meta["template"])
        return _file(work, RepairRecord(
            key=cell.key, label=cell.label, spec=spec, model=cell.model_key, scan=cell.scan_key,
            dataset=model_record.dataset, attack=model_record.attack, seed=model_record.seed,
            repairer=spec.repairer, true_target=target, scan_target=triggers.target,
            repair_trigger_class=picked.name if picked is not None else None, clean_images=len(clean),
            # "before" is the model cell's own evaluation: the same code on the same test images
            before=model_record.metrics, after=to_json(after), bundle_sha256=bundle_sha256(saved),
            repair_seconds=repair_seconds["seconds"], repair_cpu_seconds=repair_seconds["cpu_seconds"],
            **cost.fields()))


def run_floor_cell(store: Store, cell: FloorCell, *, device: str, progress: Progress) -> dict:
    """The backdoored model's own trigger on the clean model, on the backdoored model's test images."""
    _require(store, "model", cell.model_key)
    _require(store, "model", cell.clean_key)
    model_record = _backdoored_model(store, cell.model_key)
    clean_record = store.read_cell("model", cell.clean_key)
    if clean_record.target is not None or clean_record.dataset != model_record.dataset:
        raise ConfigError(f"its clean model cell {cell.clean_key} is not a clean model of {model_record.dataset}")
    backbone = cell_backbone(cell, device)
    with store.writing("floor", cell.key) as work:
        cost = _Cost(device)
        clean, meta = load_bundle(store.bundle_path("model", cell.clean_key), backbone)
        task = _model_task(model_record, cell.data_root, backbone, progress)
        if tuple(meta["classnames"]) != tuple(task.test.classnames):
            raise ConfigError(f"clean model cell {cell.clean_key} classifies other classes than {model_record.dataset}")
        truth = load_trigger(store.trigger_path(cell.model_key))
        metrics = evaluate(clean, task.test, task.base, task.new, truth, model_record.target)
        return _file(work, FloorRecord(
            key=cell.key, label=cell.label, spec=cell.spec, model=cell.model_key, clean_model=cell.clean_key,
            dataset=model_record.dataset, attack=model_record.attack, seed=model_record.seed,
            clean_seed=clean_record.seed, target=model_record.target, metrics=to_json(metrics), **cost.fields()))


def rescored_triggers(store: Store, cell: RepairCell) -> ScanTriggers:
    """The scan's triggers, with the scores and ĉ of the scorer the repair's spec names (so that ĉ follows the
    repair's key, not the scorer settings that happened to write the scan report)."""
    folder = store.scan_folder(cell.scan_key)
    triggers = ScanTriggers.read(folder)
    scoring = cell.spec.scoring
    scorer = registry().get("scorer", scoring.scorer).from_options(scoring.config)
    reference = read_reference(store, scoring.reference).classes if scoring.reference else None
    base = store.read_cell("model", cell.model_key).base_classes or None  # reports written before the seen flag
    scores = apply_scorer(scorer, mark_seen(stored_evidence(folder / "report.json"), base), reference).scores
    return attrs.evolve(triggers, scores=scores.scores, target=scores.target)


def stored_evidence(report_path: Path) -> tuple[ClassEvidence, ...]:
    """The per-class evidence of a stored scan report (without triggers), read through ``ScanReport``."""
    try:
        return read_scan_report(report_path).evidence()
    except DataError as exc:
        raise ConfigError(str(exc)) from None


RUNNERS = {"model": run_model_cell, "reference": run_reference_cell, "scan": run_scan_cell, "repair": run_repair_cell,
           "floor": run_floor_cell}


def execute(store_root: str, cell_json: Mapping[str, Any], *upstream: Mapping[str, Any], device: str = "auto",
            threads: int | None = None, verbose: bool = False) -> dict:
    """Run one cell into the store at ``store_root``; the outcome is {key, kind, label, status, seconds[, error]}.

    ``upstream`` are the outcomes of the cells this one depends on that ran in
    the same sweep (a scan's model; a repair's model and scan): a failed one
    makes this cell fail without running.  (Positional, so that Ray resolves them
    and waits for them.)
    """
    store = Store(Path(store_root))
    cell = cell_from_json(cell_json)
    outcome = {"key": cell.key, "kind": cell.kind, "label": cell.label}
    clock = time.perf_counter()
    emit = StderrProgress(quiet=not verbose)
    try:
        for before in upstream:
            if before.get("status") != "done":
                raise ConfigError(f"its {before.get('kind')} cell {before.get('label')} failed: {before.get('error')}")
        runner = RUNNERS[cell.kind]
        with torch_threads(threads):
            seed_everything(getattr(cell.spec, "seed", 0))  # a floor draws nothing: it evaluates fixed images
            runner(store, cell, device=resolve_device(device), progress=lambda m: emit(f"{cell.label}: {m}"))
    except NotApplicable as exc:  # nothing to do, and rerunning would not change that
        store.record_declined({**outcome, "spec": cell.spec.to_json(), "reason": str(exc)})
        return {**outcome, "status": "declined", "reason": str(exc), "seconds": time.perf_counter() - clock}
    except Exception as exc:  # a failing cell is recorded and the sweep goes on
        error = f"{type(exc).__name__}: {exc}"
        store.record_failure({**outcome, "spec": cell.spec.to_json(), "error": error, "traceback": traceback.format_exc()})
        return {**outcome, "status": "failed", "error": error, "seconds": time.perf_counter() - clock}
    return {**outcome, "status": "done", "seconds": time.perf_counter() - clock}
