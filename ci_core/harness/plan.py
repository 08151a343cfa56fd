"""Sweep planning: which models to train, scans to run and repairs to try, each with the key of its result.

A model cell is one (dataset, attack, seed); a scan cell is one (model, detector,
ablation setting); a reference cell is the same detector setting run on the
untuned backbone as a zero-shot classifier (``ci_core.scanning.reference``), one per
distinct (classes, pool, seed, detector setting) and shared by every model it
applies to; a repair cell is one (backdoored model, repairer) and uses
the ``ci`` scan of that model at the default ablation setting, and a floor cell
measures a repaired model's own trigger on a clean model of its dataset (what
the trigger does where there is no backdoor to remove).  Besides the
attacks, a sweep may train clean controls: ``--controls`` adds, per attack, a
model trained on that attack's own schedule with its backdoor turned off
(``Attack.control_options``), and ``--clean-seeds`` extra honest models, so that a
false-positive rate rests on clean models trained like the attacked ones.  Planning builds
every plugin's full config (defaults, the backbone's preset, the sweep's
overrides) and hashes it into the cell's key; it runs nothing, so it is cheap
and can be printed with ``--dry-run``.  Repairs only add cells: the keys of
model and scan cells do not depend on them, so a store made without repairs is
reused as it is when they are added.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar, Mapping, Sequence

import attrs

from ci_core.harness.records import (BackboneKey, FloorSpec, ModelSpec, PoolSpec, ReferenceSpec, RepairScoring,
                                     RepairSpec, ScanSpec, Spec, spec_from_json)
from ci_core.data.datasets import base_new_split
from ci_core.data.ood import BUILTIN as BUILTIN_POOL
from ci_core.data.ood import source_fingerprint
from ci_core.errors import ConfigError
from ci_core.files import slug
from ci_core.interfaces import to_json
from ci_core.models.backbone import Backbone
from ci_core.models.cocoop import DEFAULT_TEMPLATE
from ci_core.plugins import Registry
from ci_core.learning.protocol import (BENCHMARK_CANDIDATES, MAX_POOL, REFERENCE_SCORER, SCAN_SEED, default_target,
                                       pool_sizes, preset_for, scan_candidates)

CLEAN_ATTACK = "clean"  # the control: the one attack that gets no backdoor target
# Repairs take their trigger (for the most anomalous class) from this detector's scan.
REPAIR_DETECTOR = "ci"
DEFAULT_INVERSION_DATA = "ood"
INVERSION_DATA = ("ood", "id", "id-only", "task")
# Which classes a scan inverts: "all" (the paper's benchmark: up to 50 of the dataset's classes, the target among
# them) or "base" (the classes the model was tuned on, which the organisation deploys; up to 50 of them).
DEFAULT_CANDIDATE_CLASSES = "all"
CANDIDATE_CLASSES = ("all", "base")
# Detector config fields the ablation options sweep over: (option, SweepSettings attribute, config field).
ABLATION_FIELDS = (("--batch-sizes", "batch_sizes", "batch_size"), ("--losses", "losses", "loss"))


def _slug(text: str) -> str:
    return slug(text, keep="-_")  # part of every cell key: never change what it keeps


def _distinct(name: str, values: Sequence) -> None:
    duplicates = sorted({str(v) for v in values if list(values).count(v) > 1})
    if duplicates:
        raise ConfigError(f"{name}: duplicate values {duplicates}")


def _positive(name: str, values: Sequence[int]) -> None:
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise ConfigError(f"{name}: expected whole numbers of at least 1, got {bad}")


@attrs.frozen(kw_only=True)
class SweepSettings:
    """What a sweep crosses; empty ablation tuples mean the preset's (or detector's) own value."""

    attacks: tuple[str, ...]
    detectors: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    shots: int = 16
    test_per_class: int | None = None  # test images per class for ACC/ASR; None = the whole test split
    data_root: str | None = None  # where datasets that read files find them (not part of any key)
    ood: str = BUILTIN_POOL
    pool_sizes: tuple[int, ...] = ()  # |D|; () = the preset's
    holdout: int | None = None  # |T|; None = the preset's
    batch_sizes: tuple[int, ...] = ()
    losses: tuple[str, ...] = ()
    inversion_data: tuple[str, ...] = ("ood",)
    candidate_classes: tuple[str, ...] = (DEFAULT_CANDIDATE_CLASSES,)
    attack_options: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)  # plugin name -> overrides
    detector_options: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)
    scorer_options: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)
    repairers: tuple[str, ...] = ()  # () = no repair cells
    repair_shots: int = 4  # labelled clean images per base class for a repair: a subset of the model's training set
    repairer_options: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)
    reference: bool = True  # reference scans of the untuned backbone (what the calibrated scorer compares with)
    controls: tuple[str, ...] = ()  # attacks that get a clean control model on their own schedule
    clean_seeds: tuple[int, ...] = ()  # extra clean models (the clean attack) for these seeds, on every dataset
    # The seed of every scan and reference (candidates, pool, trigger initialisation), as an auditor uses one seed
    # for every model of a backbone: then one reference per dataset and detector setting serves all its models.
    # None = each model's own seed (one reference per model seed; the layout of stores before 0.4).
    scan_seed: int | None = SCAN_SEED

    def __attrs_post_init__(self):
        for name, values in (("--attacks", self.attacks), ("--detectors", self.detectors),
                             ("--datasets", self.datasets), ("--seeds", self.seeds)):
            if not values:
                raise ConfigError(f"{name}: needs at least one value")
            _distinct(name, values)
        for name, values in (("--pool-sizes", self.pool_sizes), ("--batch-sizes", self.batch_sizes),
                             ("--losses", self.losses), ("--inversion-data", self.inversion_data),
                             ("--candidate-classes", self.candidate_classes),
                             ("--repairers", self.repairers), ("--clean-seeds", self.clean_seeds),
                             ("--controls", self.controls)):
            _distinct(name, values)
        _positive("--pool-sizes", self.pool_sizes)
        too_large = [v for v in self.pool_sizes + ((self.holdout,) if self.holdout else ()) if v > MAX_POOL]
        if too_large:
            raise ConfigError(f"--pool-sizes / --holdout: at most {MAX_POOL} images, got {too_large}")
        _positive("--batch-sizes", self.batch_sizes)
        _positive("--shots", [self.shots])
        _positive("--repair-shots", [self.repair_shots])
        if self.repairers and self.repair_shots > self.shots:
            raise ConfigError(f"--repair-shots {self.repair_shots} is more than --shots {self.shots}: a repair's clean "
                              f"set is a subset of the model's few-shot training set; give --repair-shots {self.shots} "
                              "or fewer")
        if self.repairers and REPAIR_DETECTOR not in self.detectors:
            raise ConfigError(f"--repairers: a repair takes its trigger from the {REPAIR_DETECTOR!r} detector's scan "
                              f"of the model, but --detectors is {','.join(self.detectors)}; add {REPAIR_DETECTOR}")
        if self.holdout is not None:
            _positive("--holdout", [self.holdout])
        if self.test_per_class is not None:
            _positive("--test-per-class", [self.test_per_class])
        for name, values in (("--seeds", self.seeds), ("--clean-seeds", self.clean_seeds),
                             ("--scan-seed", () if self.scan_seed is None else (self.scan_seed,))):
            if any(not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**63 for s in values):
                raise ConfigError(f"{name}: expected whole numbers from 0 to 2**63 - 1, got {list(values)}")
        if not self.candidate_classes or not set(self.candidate_classes) <= set(CANDIDATE_CLASSES):
            raise ConfigError(f"--candidate-classes: expected some of {', '.join(CANDIDATE_CLASSES)}, "
                              f"got {', '.join(self.candidate_classes) or 'nothing'}")
        if not self.inversion_data or not set(self.inversion_data) <= set(INVERSION_DATA):
            raise ConfigError(f"--inversion-data: expected some of {', '.join(INVERSION_DATA)}, "
                              f"got {', '.join(self.inversion_data) or 'nothing'}")


@attrs.frozen(kw_only=True, eq=False)
class _Cell:
    """What every cell holds besides its spec; its JSON is what a worker receives (``cell_from_json`` reads it)."""

    kind: ClassVar[str]
    key: str
    label: str
    # Where the worker finds the backbone weights and the dataset files: not part of the key, which
    # holds the weights hash and the dataset name instead.
    backbone_source: str
    data_root: str | None = None

    @property
    def depends_on(self) -> tuple[str, ...]:
        """Keys of the cells whose results this one reads."""
        return ()

    def to_json(self) -> dict:
        fields = attrs.asdict(self, recurse=False)
        return {"kind": self.kind, **fields, "spec": self.spec.to_json()}


@attrs.frozen(kw_only=True, eq=False)
class ModelCell(_Cell):
    kind: ClassVar[str] = "model"
    spec: ModelSpec  # everything the result depends on; hashed into the key


@attrs.frozen(kw_only=True, eq=False)
class ReferenceCell(_Cell):
    """The detector run on the untuned backbone (zero-shot) over one set of classes, pool and seed."""

    kind: ClassVar[str] = "reference"
    spec: ReferenceSpec
    dataset: str  # whose images an in-distribution inversion set takes (not part of the key unless used)


@attrs.frozen(kw_only=True, eq=False)
class ScanCell(_Cell):
    kind: ClassVar[str] = "scan"
    spec: ScanSpec
    model_key: str
    variant: dict  # the ablation values of this scan (pool size, batch size, loss, inversion data)
    reference_key: str | None = None  # its reference cell (None: the sweep runs without references)
    scoring: dict = attrs.Factory(dict)  # scorer name -> config its verdict is read with (not part of the key)

    @property
    def depends_on(self) -> tuple[str, ...]:
        return (self.model_key,) + ((self.reference_key,) if self.reference_key else ())


@attrs.frozen(kw_only=True, eq=False)
class RepairCell(_Cell):
    kind: ClassVar[str] = "repair"
    spec: RepairSpec
    model_key: str
    scan_key: str  # the scan whose trigger the repairer takes

    @property
    def depends_on(self) -> tuple[str, ...]:
        return (self.model_key, self.scan_key)


@attrs.frozen(kw_only=True, eq=False)
class FloorCell(_Cell):
    """A repaired model's own trigger on a clean model of its dataset (``FloorSpec``)."""

    kind: ClassVar[str] = "floor"
    spec: FloorSpec
    model_key: str
    clean_key: str

    @property
    def depends_on(self) -> tuple[str, ...]:
        return (self.model_key, self.clean_key)


Cell = ModelCell | ReferenceCell | ScanCell | RepairCell | FloorCell
CELL_CLASSES = {cls.kind: cls for cls in (ModelCell, ReferenceCell, ScanCell, RepairCell, FloorCell)}


def cell_from_json(data: Mapping[str, Any]) -> Cell:
    data = dict(data)
    kind = data.pop("kind")
    data["spec"] = spec_from_json(data["spec"], f"{kind} cell {data.get('key')}")
    return CELL_CLASSES[kind](**data)


@attrs.frozen(kw_only=True)
class SkippedRepairs:
    """Repairs the plan leaves out, with the reason (not failures: there is nothing they could do)."""

    attack: str
    repairers: tuple[str, ...]
    reason: str

    def to_json(self) -> dict:
        return {"attack": self.attack, "repairers": list(self.repairers), "reason": self.reason}


@attrs.frozen(kw_only=True, eq=False)
class Plan:
    models: tuple[ModelCell, ...]
    scans: tuple[ScanCell, ...]
    repairs: tuple[RepairCell, ...] = ()
    references: tuple[ReferenceCell, ...] = ()
    skipped_repairs: tuple[SkippedRepairs, ...] = ()
    floors: tuple[FloorCell, ...] = ()  # per repaired model, its trigger on a clean model of its dataset
    repair_setting: dict | None = None  # the ablation values of the scans repairs use (None: no repairs asked)
    scoring: dict = attrs.Factory(dict)  # scorer name -> config the verdicts are read with (not part of any key)

    def cells(self) -> list[Cell]:
        """Each model followed by its scans (each after its reference) and then its repairs, so that results for
        every setting appear early; the floors last (each needs two models)."""
        after: dict[str, list[Cell]] = {}
        for cell in self.scans + self.repairs:
            after.setdefault(cell.model_key, []).append(cell)
        references = {cell.key: cell for cell in self.references}
        ordered: list[Cell] = []
        for model in self.models:
            ordered.append(model)
            for cell in after.get(model.key, ()):
                reference = references.pop(getattr(cell, "reference_key", None) or "", None)
                if reference is not None:
                    ordered.append(reference)
                ordered.append(cell)
        return ordered + list(references.values()) + list(self.floors)

    def counts(self) -> str:
        """'2 models, 4 scans' (and ', 2 references', ', 8 repairs', ', 2 floors' when the plan has them)."""
        text = f"{len(self.models)} models, {len(self.scans)} scans"
        text += f", {len(self.references)} references" if self.references else ""
        text += f", {len(self.repairs)} repairs" if self.repairs else ""
        return text + (f", {len(self.floors)} floors" if self.floors else "")

    def describe(self) -> dict:
        described = {"cells": [{"kind": c.kind, "key": c.key, "label": c.label} for c in self.cells()]}
        if self.skipped_repairs:  # only then, so that a plan without repairs is recorded as before
            described["skipped_repairs"] = [s.to_json() for s in self.skipped_repairs]
        return described


def variant_label(variant: Mapping[str, Any]) -> str:
    """A short description of a scan's ablation values, e.g. '|D|=256, batch 8, margin, ood'."""
    parts = [f"|D|={variant['pool_size']}"]
    if variant.get("batch_size") is not None:
        parts.append(f"batch {variant['batch_size']}")
    if variant.get("loss") is not None:
        parts.append(str(variant["loss"]))
    parts.append(str(variant["inversion_data"]))
    if variant.get("classes", DEFAULT_CANDIDATE_CLASSES) != DEFAULT_CANDIDATE_CLASSES:
        parts.append(f"{variant['classes']} classes")
    return ", ".join(parts)


def backbone_key(backbone: Backbone) -> BackboneKey:
    """The backbone as the key sees it: architecture and weights hash (not the file they came from)."""
    return BackboneKey(name=backbone.name, weights_sha256=backbone.weights_sha256)


def _key(prefix: str, spec: Spec) -> str:
    return f"{prefix}-{spec.hash[:20]}"


def _ood_identity(source: str) -> str:
    # A folder is identified by its path and a fingerprint of its image files: refilling it changes the keys.
    return source_fingerprint(source)


def _check_option_targets(flag: str, options: Mapping[str, Mapping], selected: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(selected))
    if unknown:
        raise ConfigError(f"{flag}: {', '.join(unknown)} is not in this sweep (it has {', '.join(selected) or 'none'})")


def _detector_variants(cls: type, options: Mapping[str, Any], settings: SweepSettings, preset: str | None) -> list:
    fields = attrs.fields_dict(cls.Config)
    axes = []
    for flag, attribute, field in ABLATION_FIELDS:
        values = getattr(settings, attribute)
        if values and field in fields:
            if field in options:
                raise ConfigError(f"--detector-option {cls.name}.{field} and {flag} both set {field}; give one of them")
            axes.append([(field, value) for value in values])
    return [cls.from_options({**options, **dict(combo)}, preset=preset) for combo in itertools.product(*axes)]


def _preferred(default: Any, swept: Sequence) -> Any:
    """The default when the sweep has it (or sweeps nothing on this axis), else the first value swept."""
    return default if not swept or default in swept else swept[0]


def _repair_variant(cls: type, options: Mapping[str, Any], settings: SweepSettings, preset: str | None,
                    default_inversion: int) -> dict:
    """The ablation values of the scan a repair uses: each axis at its default, or at its first value if not swept."""
    config = to_json(cls.from_options(options, preset=preset).config)
    chosen = {field: _preferred(config[field], getattr(settings, attribute))
              for _, attribute, field in ABLATION_FIELDS if field in config}
    return {"config": chosen,
            "pool_size": _preferred(default_inversion, settings.pool_sizes),
            "inversion_data": _preferred(DEFAULT_INVERSION_DATA, settings.inversion_data),
            "classes": _preferred(DEFAULT_CANDIDATE_CLASSES, settings.candidate_classes)}


def _repair_skips(attack_name: str, attack_cls: type, repairers: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Why some repairers get no cell for this attack's models: {reason: repairer names}.

    Known before anything is trained: the attack declares the kind of bundle it
    writes (``Attack.bundle_kind``), each repairer the kinds it can repair.
    """
    if attack_name == CLEAN_ATTACK:
        return {"a clean model has no backdoor to remove (Table 19 is over backdoored models)": tuple(repairers)}
    reasons: dict[str, tuple[str, ...]] = {}
    for name, repairer in repairers.items():
        if attack_cls.bundle_kind not in repairer.bundle_kinds:
            accepted = ", ".join(repr(kind) for kind in repairer.bundle_kinds)
            reason = (f"its models are {attack_cls.bundle_kind!r} bundles, which these repairers cannot repair "
                      f"(they take {accepted} bundles)")
            reasons[reason] = reasons.get(reason, ()) + (name,)
    return reasons


def plan_sweep(settings: SweepSettings, backbone: Backbone, plugins: Registry) -> Plan:
    """Every model, scan and repair cell of ``settings`` on ``backbone``, with their keys."""
    preset = preset_for(backbone)
    default_inversion, default_holdout = pool_sizes(preset)
    inversion_sizes = settings.pool_sizes or (default_inversion,)
    holdout = settings.holdout or default_holdout
    ident = backbone_key(backbone)

    unknown = sorted(set(settings.controls) - set(settings.attacks))
    if unknown:
        raise ConfigError(f"--controls: {', '.join(unknown)} is not in this sweep's --attacks")
    lacking = [name for name in settings.controls if not plugins.get("attack", name).control_options]
    if lacking:
        raise ConfigError(f"--controls: {', '.join(lacking)} has no clean control (no control_options: "
                          f"{CLEAN_ATTACK!r} is honest already)")
    for flag, options, selected in (("--attack-option", settings.attack_options, settings.attacks),
                                    ("--detector-option", settings.detector_options, settings.detectors),
                                    ("--repairer-option", settings.repairer_options, settings.repairers)):
        _check_option_targets(flag, options, selected)
    for name in settings.datasets:  # fails now, naming the missing folder or file, rather than in every cell
        plugins.get("dataset", name).open(settings.data_root)
    datasets = settings.datasets
    attack_classes = {name: plugins.get("attack", name) for name in settings.attacks}
    attacks = {name: cls.from_options(settings.attack_options.get(name), preset=preset)
               for name, cls in attack_classes.items()}
    repairers = {name: plugins.get("repairer", name).from_options(settings.repairer_options.get(name), preset=preset)
                 for name in settings.repairers}
    detector_classes = {name: plugins.get("detector", name) for name in settings.detectors}
    for flag, attribute, field in ABLATION_FIELDS:
        if getattr(settings, attribute) and not any(
                field in attrs.fields_dict(cls.Config) for cls in detector_classes.values()):
            raise ConfigError(f"{flag}: none of the detectors ({', '.join(settings.detectors)}) has a {field!r} option")
    detectors = {name: _detector_variants(cls, settings.detector_options.get(name, {}), settings, preset)
                 for name, cls in detector_classes.items()}
    own_scorers = sorted({d.default_scorer for variants in detectors.values() for d in variants})
    scorer_names = ([REFERENCE_SCORER] if settings.reference else []) + own_scorers
    _check_option_targets("--scorer-option", settings.scorer_options, scorer_names)
    scorers = {name: plugins.get("scorer", name).from_options(settings.scorer_options.get(name), preset=preset)
               for name in scorer_names}
    scoring = {name: to_json(scorer.config) for name, scorer in scorers.items()}
    repair_variant = None
    if repairers:
        repair_variant = _repair_variant(detector_classes[REPAIR_DETECTOR],
                                         settings.detector_options.get(REPAIR_DETECTOR, {}), settings, preset,
                                         default_inversion)
        # How a repair's class ĉ is chosen: by the scorer that decides the repair detector's verdict.
        repair_decider = REFERENCE_SCORER if settings.reference else detector_classes[REPAIR_DETECTOR].default_scorer
    skipped: dict[tuple[str, str], tuple[str, ...]] = {}
    for attack_name in attacks if repairers else ():
        for reason, names in _repair_skips(attack_name, attack_classes[attack_name], repairers).items():
            skipped[(attack_name, reason)] = names

    jobs = _model_jobs(settings, attacks, attack_classes, plugins, preset)
    base_classes = {name: base_new_split(plugins.get("dataset", name).open(settings.data_root).classnames)
                    for name in datasets}
    ood = _ood_identity(settings.ood)
    models, scans, repairs, references = [], [], [], {}
    repair_setting = None
    for job in jobs:
        seed, dataset, attack_name, config, role = job
        control = role == "control"
        backdoor = role == "attack" and attack_name != CLEAN_ATTACK
        model_spec = ModelSpec(dataset=dataset, seed=seed, shots=settings.shots, test_per_class=settings.test_per_class,
                               attack=attack_name, attack_config=config, backdoor=backdoor, backbone=ident,
                               control=control)
        shown = f"{attack_name} control" if control else attack_name
        model_stem = f"{_slug(shown.replace(' ', '-'))}-{_slug(dataset)}-s{seed}"
        model_key = _key(model_stem, model_spec)
        if any(m.key == model_key for m in models):
            continue  # a --clean-seeds model the attacks already train
        base, new = base_classes[dataset]
        target = default_target(base, seed) if backdoor else None
        scan_seed = seed if settings.scan_seed is None else settings.scan_seed
        repair_scan = None  # the scan this model's repairs use
        models.append(ModelCell(key=model_key, spec=model_spec, label=f"{shown}/{dataset}/seed {seed}",
                                backbone_source=backbone.pretrained, data_root=settings.data_root))
        for detector_name, variants in detectors.items():
            axes = (variants, inversion_sizes, settings.inversion_data, settings.candidate_classes)
            several = math.prod(len(axis) for axis in axes) > 1
            for detector, inversion, data, which in itertools.product(*axes):
                candidates = scan_candidates(base, new, which, seed=scan_seed, target=target)
                detector_config = to_json(detector.config)
                pool = PoolSpec(source=ood, inversion=inversion, holdout=holdout, inversion_data=data)
                variant = {"pool_size": inversion, "holdout": holdout, "inversion_data": data,
                           "batch_size": detector_config.get("batch_size"), "loss": detector_config.get("loss"),
                           "classes": which}
                reference = None
                if settings.reference:
                    reference = _reference_cell(detector_name, detector_config, candidates, pool, scan_seed, dataset,
                                                ident, variant if several else None, settings, backbone)
                    reference = references.setdefault(reference.key, reference)
                scan_spec = ScanSpec(model=model_key, seed=scan_seed, candidates=BENCHMARK_CANDIDATES,
                                     classes=which, detector=detector_name, detector_config=detector_config, pool=pool,
                                     backbone=ident)
                key = _key(f"{_slug(detector_name)}-{model_stem}", scan_spec)
                detector_label = f"{detector_name} [{variant_label(variant)}]" if several else detector_name
                scans.append(ScanCell(key=key, spec=scan_spec, label=f"{detector_label} on {shown}/{dataset}/seed {seed}",
                                      backbone_source=backbone.pretrained, model_key=model_key, variant=variant,
                                      reference_key=reference.key if reference is not None else None,
                                      scoring=scoring, data_root=settings.data_root))
                if (repair_variant is not None and detector_name == REPAIR_DETECTOR
                        and (inversion, data, which) == (repair_variant["pool_size"], repair_variant["inversion_data"],
                                                         repair_variant["classes"])
                        and all(detector_config[f] == v for f, v in repair_variant["config"].items())):
                    repair_scan, repair_setting = scans[-1], variant
        if not backdoor:
            continue  # nothing to repair in a clean model or a control
        refused = {name for (attack, _), names in skipped.items() if attack == attack_name for name in names}
        for repairer_name, repairer in repairers.items():
            if repairer_name in refused:
                continue
            assert repair_scan is not None, "the repair variant is one of the planned ci scans"
            repair_spec = RepairSpec(
                model=model_key, scan=repair_scan.key, seed=seed, repairer=repairer_name,
                repairer_config=to_json(repairer.config), repair_shots=settings.repair_shots, backbone=ident,
                scoring=RepairScoring(scorer=repair_decider, config=scoring[repair_decider],
                                      reference=repair_scan.reference_key))
            key = _key(f"{_slug(repairer_name)}-{model_stem}", repair_spec)
            repairs.append(RepairCell(key=key, spec=repair_spec, label=f"{repairer_name} repair of "
                                      f"{attack_name}/{dataset}/seed {seed}", backbone_source=backbone.pretrained,
                                      model_key=model_key, scan_key=repair_scan.key, data_root=settings.data_root))
    return Plan(models=tuple(models), scans=tuple(scans), repairs=tuple(repairs),
                references=tuple(references.values()), floors=_floor_cells(models, repairs, ident, backbone),
                skipped_repairs=tuple(SkippedRepairs(attack=attack, repairers=names, reason=reason)
                                      for (attack, reason), names in skipped.items()),
                repair_setting=repair_setting, scoring=scoring)


def _floor_cells(models: Sequence[ModelCell], repairs: Sequence[RepairCell], ident: BackboneKey,
                 backbone: Backbone) -> tuple[FloorCell, ...]:
    """One floor per repaired model: its trigger on the sweep's clean model of the same dataset, the one of the
    same seed (tuned on the same few-shot images) if the sweep has it, else the lowest clean seed; none without."""
    clean: dict[str, list[ModelCell]] = {}
    for model in models:
        if model.spec.attack == CLEAN_ATTACK and not model.spec.control:
            clean.setdefault(model.spec.dataset, []).append(model)
    floors = []
    repaired = {cell.model_key for cell in repairs}
    for model in models:
        choices = clean.get(model.spec.dataset)
        if model.key not in repaired or not choices:
            continue
        honest = next((c for c in choices if c.spec.seed == model.spec.seed), min(choices, key=lambda c: c.spec.seed))
        spec = FloorSpec(model=model.key, clean_model=honest.key, backbone=ident)
        floors.append(FloorCell(key=_key(f"floor-{model.key.rsplit('-', 1)[0]}", spec), spec=spec,
                                label=f"floor of {model.label} (clean seed {honest.spec.seed})",
                                backbone_source=backbone.pretrained, model_key=model.key, clean_key=honest.key,
                                data_root=model.data_root))
    return tuple(floors)


def _model_jobs(settings: SweepSettings, attacks: Mapping[str, Any], attack_classes: Mapping[str, type],
                plugins: Registry, preset: str | None) -> list[tuple[int, str, str, dict, str]]:
    """(seed, dataset, attack, attack config, role) of every model: role 'attack', 'control' or 'clean'."""
    jobs = []
    for seed, dataset, (name, attack) in itertools.product(settings.seeds, settings.datasets, attacks.items()):
        jobs.append((seed, dataset, name, to_json(attack.config), "attack"))
        control = attack_classes[name].control_options
        if name in settings.controls:
            options = {**settings.attack_options.get(name, {}), **control}
            config = attack_classes[name].from_options(options, preset=preset).config
            jobs.append((seed, dataset, name, to_json(config), "control"))
    if settings.clean_seeds:
        clean = plugins.get("attack", CLEAN_ATTACK).from_options(settings.attack_options.get(CLEAN_ATTACK),
                                                                 preset=preset)
        jobs += [(seed, dataset, CLEAN_ATTACK, to_json(clean.config), "clean")
                 for seed, dataset in itertools.product(settings.clean_seeds, settings.datasets)]
    return jobs


def _reference_cell(detector: str, detector_config: dict, candidates: Sequence[str], pool: PoolSpec, seed: int,
                    dataset: str, ident: BackboneKey, variant: dict | None, settings: SweepSettings,
                    backbone: Backbone) -> ReferenceCell:
    """The reference of a scan: the same classes, pool, seed and detector setting on the untuned backbone."""
    in_distribution = pool.inversion_data != "ood"
    spec = ReferenceSpec(backbone=ident, template=DEFAULT_TEMPLATE, classnames=tuple(candidates), pool=pool, seed=seed,
                         detector=detector, detector_config=detector_config,
                         dataset=dataset if in_distribution else None)  # D is then the dataset's own images
    where = f"{dataset} images" if in_distribution else f"{len(candidates)} classes of {dataset}"
    key = _key(f"ref-{_slug(detector)}-{_slug(dataset)}-s{seed}", spec)
    shown = f"{detector} [{variant_label(variant)}]" if variant is not None else detector
    return ReferenceCell(key=key, spec=spec, label=f"{shown} on {where}/seed {seed}",
                         backbone_source=backbone.pretrained, dataset=dataset, data_root=settings.data_root)
