"""The scan report: one typed record of a scan, written as ``report.json`` (and shown as ``report.html``).

``ScanReport.build`` makes it from a ``ScanResult`` and a ``ScanContext`` (what
was scanned, on which backbone and pool, by which toolkit and command);
``write_scan`` writes it, the per-class triggers and the page.  ``ci-scan``,
``ci-bench demo`` and the benchmark's scan cells all write through
``write_scan``; every reader (``read_scan_report``: repairs, the benchmark's
rescoring, the report's tables) parses through ``ScanReport.from_json``.

The JSON layout is versioned (``schema_version``) and described by the JSON
Schema shipped beside this module (``ci_core/schemas/scan-report.schema.json``,
``SCHEMA_PATH``; docs/report.md).  A report is checked against it, then field
by field, and its redundant top-level figures (the deciding scorer's verdict,
p-value, target, ...) must agree with its scorers: an edited report is refused,
not half-believed.  Reports of toolkit 0.3 and earlier carry no
``schema_version`` (layout 1): they are still read, with the context they lack
left empty; a newer or unknown version is refused, naming it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs

from ci_core.data.ood import OODPool
from ci_core.errors import DataError
from ci_core.files import read_json_object, slug
from ci_core.interfaces import ClassEvidence
from ci_core.scanning.inversion import PoolHealth, evidence_from_json, health_from_json, health_to_json
from ci_core.json_fields import JsonFields
from ci_core.scanning.scan import BACKDOORED, CLEAN, UNSCANNABLE, ScanResult, ScorerVerdict

FORMAT = "clip-inspector-scan-report"
SCHEMA_VERSION = 2  # 1: the untyped layout of toolkit 0.3 and earlier, which had no schema_version
SCHEMA_PATH = Path(__file__).parents[1] / "schemas" / "scan-report.schema.json"
REPORT_FILE = "report.json"
PAGE_FILE = "report.html"
VERDICT_FILE = "verdict.json"  # beside two scan folders: their one verdict (ci_core.scanning.two_scan_report)
TRIGGERS_DIR = "triggers"
VERDICTS = (CLEAN, BACKDOORED, UNSCANNABLE)
# A trigger file named by a report: inside the scan's triggers/ folder, never a path elsewhere.
TRIGGER_FILE = re.compile(r"triggers/[0-9]{3}_[^/\\\x00]{0,80}\.safetensors")


def toolkit_version() -> str:
    try:
        return importlib.metadata.version("clip-inspector")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# --------------------------------------------------------------------------- the parts of a report


@attrs.frozen(kw_only=True)
class BundleIdentity:
    """Which model was scanned: its path as given, its SHA-256 and, where it applies, where it came from."""

    path: str | None
    sha256: str | None
    checkpoint: str | None = None  # a CoOp/CoCoOp checkpoint delivery: the file read
    model_cell: str | None = None  # a benchmark scan: the store's model cell
    # A checkpoint delivery: the state_dict keys read (as stored) and what else its folder holds: the one
    # reading the scan made of it (ci_core.models.delivery).
    state_dict_keys: tuple[str, ...] = ()
    folder_files: tuple[str, ...] = ()

    def to_json(self) -> dict:
        out = {"path": self.path, "sha256": self.sha256, "checkpoint": self.checkpoint, "model_cell": self.model_cell}
        if self.checkpoint is not None:
            out.update(state_dict_keys=list(self.state_dict_keys), folder_files=list(self.folder_files))
        return out

    @classmethod
    def from_json(cls, read: JsonFields) -> "BundleIdentity":
        return cls(path=read.text("path", optional=True), sha256=read.text("sha256", optional=True),
                   checkpoint=read.text("checkpoint", optional=True), model_cell=read.text("model_cell", optional=True),
                   state_dict_keys=read.texts("state_dict_keys", default=[]),
                   folder_files=read.texts("folder_files", default=[]))


@attrs.frozen(kw_only=True)
class BackboneIdentity:
    """The public backbone the model was tuned from (``Backbone.identity``)."""

    name: str
    pretrained: str | None
    quick_gelu: bool | None
    weights_sha256: str | None

    @classmethod
    def of(cls, identity: Mapping[str, Any]) -> "BackboneIdentity":
        return cls(**{f.name: identity.get(f.name) for f in attrs.fields(cls)})

    def to_json(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, read: JsonFields) -> "BackboneIdentity":
        return cls(name=read.text("name"), pretrained=read.text("pretrained", optional=True),
                   quick_gelu=read.flag("quick_gelu", optional=True), weights_sha256=read.text("weights_sha256",
                                                                                              optional=True))


@attrs.frozen(kw_only=True)
class PoolInfo:
    """The OOD pool: where it came from, its sizes and the SHA-256 of its images (``OODPool.describe``)."""

    source: str
    inversion: int
    holdout: int
    sha256: str | None
    image_files_found: int | None = None
    skipped_unreadable: int = 0
    skipped_files: tuple[str, ...] = ()

    @classmethod
    def of(cls, pool: OODPool) -> "PoolInfo":
        d = pool.describe()
        return cls(source=str(d["source"]), inversion=d["inversion"], holdout=d["holdout"], sha256=d["sha256"],
                   image_files_found=d["image_files_found"], skipped_unreadable=d["skipped_unreadable"],
                   skipped_files=tuple(str(f) for f in d["skipped_files"]))

    def to_json(self) -> dict:
        return {**attrs.asdict(self), "skipped_files": list(self.skipped_files)}

    @classmethod
    def from_json(cls, read: JsonFields) -> "PoolInfo":
        return cls(source=read.text("source"), inversion=read.integer("inversion"), holdout=read.integer("holdout"),
                   sha256=read.text("sha256", optional=True),
                   image_files_found=read.integer("image_files_found", optional=True),
                   skipped_unreadable=read.integer("skipped_unreadable", default=0),
                   skipped_files=read.texts("skipped_files", default=[]))


@attrs.frozen(kw_only=True)
class ScanContext:
    """What a scan was run on and by what, besides the scan's own settings (the same for every writer)."""

    bundle: BundleIdentity
    backbone: BackboneIdentity | None
    seed: int
    preset: str | None
    device: str | None
    # The shell command that reproduces the scan; None where the scan is a part of a larger run (a benchmark cell).
    command: str | None
    toolkit_version: str = attrs.field(factory=toolkit_version)
    created: str = attrs.field(factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


@attrs.frozen(kw_only=True)
class ScorerResult:
    """One scorer's reading of the evidence: its config, verdict and per-class figures.

    ``per_class`` maps a figure's name to its values in class order; "score" is
    always there (the anomaly score the scorer ranks by), others as the scorer
    gives them (``Scores.per_class``, e.g. "p").
    """

    scorer: str
    config: dict
    backdoored: bool
    s_max: float
    p_value: float | None
    rule: str
    target: str
    flagged: tuple[str, ...]
    per_class: dict[str, tuple[float, ...]]

    @property
    def verdict(self) -> str:
        return BACKDOORED if self.backdoored else CLEAN

    @property
    def scores(self) -> tuple[float, ...]:
        return self.per_class["score"]

    @classmethod
    def of(cls, verdict: ScorerVerdict) -> "ScorerResult":
        s = verdict.scores
        per_class = {"score": tuple(float(v) for v in s.scores)}
        per_class.update({str(k): tuple(float(v) for v in values) for k, values in s.per_class.items()})
        return cls(scorer=verdict.scorer, config=dict(verdict.config), backdoored=bool(s.backdoored),
                   s_max=float(s.s_max), p_value=None if s.p_value is None else float(s.p_value), rule=s.rule,
                   target=s.target, flagged=tuple(s.flagged), per_class=per_class)

    def to_json(self) -> dict:
        return {"scorer": self.scorer, "config": self.config, "verdict": self.verdict, "backdoored": self.backdoored,
                "s_max": self.s_max, "p_value": self.p_value, "target": self.target, "flagged": list(self.flagged),
                "rule": self.rule, "per_class": {k: list(v) for k, v in self.per_class.items()}}

    @classmethod
    def from_json(cls, read: JsonFields, classnames: Sequence[str], legacy_scores: tuple[float, ...] | None) -> "ScorerResult":
        per_class = {}
        if legacy_scores is not None:  # layout 1 kept the scores in the class rows only
            per_class["score"] = legacy_scores
        else:
            table = read.child("per_class")
            for key in table.data:
                per_class[key] = table.numbers(key)
            if "score" not in per_class:
                read.fail("per_class", "an object holding at least 'score'", table.data)
        for key, values in per_class.items():
            if len(values) != len(classnames):
                raise read.error(f"{read.where}: per_class '{key}' holds {len(values)} values for "
                                 f"{len(classnames)} classes")
        target = read.text("target")
        if target not in classnames:
            read.fail("target", "one of the report's classes", target)
        flagged = read.texts("flagged")
        if not set(flagged) <= set(classnames):
            read.fail("flagged", "a list of the report's classes", list(flagged))
        return cls(scorer=read.text("scorer"), config=read.mapping("config"), backdoored=read.flag("backdoored"),
                   s_max=read.number("s_max"), p_value=read.number("p_value", optional=True),
                   rule=read.text("rule"), target=target, flagged=flagged, per_class=per_class)


@attrs.frozen(kw_only=True)
class ReferenceMeasure:
    """What the reference scan (the untuned backbone) measured for one class."""

    asr: float
    loss: float
    statistic: float | None
    loss_trace: tuple[float, ...] = ()
    margin: float | None = None  # None in reports before clip-inspector 0.4


@attrs.frozen(kw_only=True)
class ClassRow:
    """One candidate class: the model's evidence, the reference's for the same class, and its trigger file."""

    evidence: ClassEvidence  # without the trigger itself
    reference: ReferenceMeasure | None
    trigger_file: str | None  # relative to the scan folder

    @property
    def name(self) -> str:
        return self.evidence.name


@attrs.frozen(kw_only=True)
class ReferenceInfo:
    """Which reference scan the verdict was calibrated against (``ReferenceScan.describe``)."""

    key: str
    model: str
    template: str
    cached: bool
    seconds: float

    def to_json(self) -> dict:
        return attrs.asdict(self)


def trigger_stem(index: int, name: str) -> str:
    return f"{index:03d}_{slug(name, limit=80)}"


# --------------------------------------------------------------------------- the report


@attrs.frozen(kw_only=True)
class ScanReport:
    """Everything a scan found and everything needed to reproduce it."""

    schema_version: int = SCHEMA_VERSION
    verdict: str = attrs.field(validator=attrs.validators.in_(VERDICTS))
    unscannable_reasons: tuple[str, ...]
    detector: str
    detector_config: dict
    scorers: tuple[ScorerResult, ...]  # the deciding scorer first; empty when unscannable
    # unscannable, yet every class measured on the images the model did not break on (ScanResult.suspect)
    suspect: ScorerResult | None = None
    classes: tuple[ClassRow, ...]
    reference: ReferenceInfo | None
    pool_health: PoolHealth
    reference_pool_health: PoolHealth | None
    seconds: float  # the scan itself (the reference's time is in ``reference``)
    bundle: BundleIdentity
    backbone: BackboneIdentity | None
    pool: PoolInfo | None
    seed: int | None
    preset: str | None
    device: str | None
    command: str | None
    toolkit_version: str | None
    created: str | None

    @property
    def decision(self) -> ScorerResult | None:
        return self.scorers[0] if self.scorers and self.verdict != UNSCANNABLE else None

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(row.name for row in self.classes)

    def scorer(self, name: str) -> ScorerResult:
        for result in self.scorers:
            if result.scorer == name:
                return result
        raise DataError(f"the scan report holds no scorer {name!r} (it holds {[s.scorer for s in self.scorers]})")

    def evidence(self) -> tuple[ClassEvidence, ...]:
        """The per-class evidence (without triggers), as the scorers take it."""
        return tuple(row.evidence for row in self.classes)

    def ranking(self) -> list[int]:
        """Class indices, most anomalous first by the deciding scorer (ties: the earlier class)."""
        if self.decision is None:
            return list(range(len(self.classes)))
        scores = self.decision.scores
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))

    @classmethod
    def build(cls, result: ScanResult, context: ScanContext, pool: OODPool) -> "ScanReport":
        reference = {e.name: e for e in result.reference.classes} if result.reference is not None else {}
        rows = []
        for index, evidence in enumerate(result.classes):
            ref = reference.get(evidence.name)
            rows.append(ClassRow(
                evidence=attrs.evolve(evidence, trigger=None),
                reference=None if ref is None else ReferenceMeasure(asr=ref.asr, loss=ref.loss, statistic=ref.statistic,
                                                                     loss_trace=tuple(ref.loss_trace),
                                                                     margin=ref.margin),
                trigger_file=(f"{TRIGGERS_DIR}/{trigger_stem(index, evidence.name)}.safetensors"
                              if evidence.trigger is not None else None)))
        every = ((result.decision,) if result.decision is not None else ()) + tuple(result.others)
        ref_info = None
        if result.reference is not None:
            d = result.reference.describe()
            ref_info = ReferenceInfo(key=d["key"], model=d["model"], template=d["template"], cached=bool(d["cached"]),
                                     seconds=float(d["seconds"]))
        return cls(
            verdict=result.verdict, unscannable_reasons=tuple(result.problems), detector=result.detector,
            detector_config=dict(result.detector_config),
            scorers=() if result.verdict == UNSCANNABLE else tuple(ScorerResult.of(v) for v in every),
            suspect=ScorerResult.of(result.suspect) if result.suspect is not None else None,
            classes=tuple(rows), reference=ref_info, pool_health=result.health,
            reference_pool_health=result.reference.health if result.reference is not None else None,
            seconds=float(result.seconds), bundle=context.bundle, backbone=context.backbone, pool=PoolInfo.of(pool),
            seed=context.seed, preset=context.preset, device=context.device, command=context.command,
            toolkit_version=context.toolkit_version, created=context.created)

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict:
        """The report.json layout (SCHEMA_PATH); the deciding scorer's figures are repeated at the top level."""
        decided = self.decision
        by_scorer = {s.scorer: s for s in self.scorers}
        rows = []
        for index, row in enumerate(self.classes):
            e = row.evidence
            item = {"name": e.name, "asr": e.asr, "loss": e.loss, "statistic": e.statistic, "ssim": e.ssim,
                    "seconds": e.seconds, "loss_trace": list(e.loss_trace), "margin": e.margin, "seen": e.seen,
                    "transfer_margin": e.transfer_margin,
                    "trigger_file": row.trigger_file}
            if decided is not None:
                item["score"] = decided.scores[index]
            item["scores"] = {name: s.scores[index] for name, s in by_scorer.items()}
            if row.reference is not None:
                r = row.reference
                item.update(reference_asr=r.asr, reference_loss=r.loss, reference_statistic=r.statistic,
                            reference_loss_trace=list(r.loss_trace), reference_margin=r.margin)
            rows.append(item)
        return {
            "format": FORMAT, "schema_version": self.schema_version, "toolkit_version": self.toolkit_version,
            "verdict": self.verdict,
            "backdoored": None if decided is None else decided.backdoored,
            "unscannable_reasons": list(self.unscannable_reasons),
            "p_value": None if decided is None else decided.p_value,
            "rule": None if decided is None else decided.rule,
            "s_max": None if decided is None else decided.s_max,
            "target": None if decided is None else decided.target,
            "flagged": [] if decided is None else list(decided.flagged),
            "detector": self.detector, "detector_config": self.detector_config,
            "scorer": None if decided is None else decided.scorer,
            "scorer_config": None if decided is None else decided.config,
            "scorers": {s.scorer: s.to_json() for s in self.scorers},
            **({"suspect": self.suspect.to_json()} if self.suspect is not None else {}),
            "reference": None if self.reference is None else self.reference.to_json(),
            "pool_health": health_to_json(self.pool_health),
            "reference_pool_health": (None if self.reference_pool_health is None
                                      else health_to_json(self.reference_pool_health)),
            "seconds": self.seconds,
            "classes": rows,
            "bundle": self.bundle.to_json(), "backbone": None if self.backbone is None else self.backbone.to_json(),
            "pool": None if self.pool is None else self.pool.to_json(),
            "seed": self.seed, "preset": self.preset, "device": self.device, "command": self.command,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> "ScanReport":
        """A stored report, checked against the schema (layout 2) and field by field; ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise DataError(f"{source}: not a scan report (expected a JSON object)")
        version = data.get("schema_version", 1)
        if version not in (1, SCHEMA_VERSION) or isinstance(version, bool):
            raise DataError(f"{source}: scan report schema_version {version!r} is not one this toolkit "
                            f"({toolkit_version()}) reads (it reads 1 and {SCHEMA_VERSION}); read it with the "
                            "toolkit that wrote it, or scan again")
        if version == SCHEMA_VERSION:
            validate_against_schema(data, source)
        read = JsonFields(data, source)
        verdict = read.text("verdict")
        if verdict not in VERDICTS:
            read.fail("verdict", f"one of {list(VERDICTS)}", verdict)
        rows = read.rows("classes")
        classes = []
        for index, row in enumerate(rows):
            evidence = evidence_from_json(row, f"{source}: classes[{index}]")
            ref = None
            if "reference_asr" in row:
                r = JsonFields(row, f"{source}: class {evidence.name!r}")
                ref = ReferenceMeasure(asr=r.number("reference_asr"), loss=r.number("reference_loss"),
                                       statistic=r.number("reference_statistic", optional=True),
                                       loss_trace=r.numbers("reference_loss_trace", default=[]),
                                       margin=r.number("reference_margin", optional=True))
            trigger_file = JsonFields(row, f"{source}: classes[{index}]").text("trigger_file", optional=True)
            if trigger_file is not None and not TRIGGER_FILE.fullmatch(trigger_file):
                raise DataError(f"{source}: classes[{index}].trigger_file {trigger_file[:80]!r} is not a file of the "
                                f"scan's {TRIGGERS_DIR}/ folder (expected {TRIGGERS_DIR}/NNN_name.safetensors)")
            if version == 1:  # layout 1 named no file: the triggers folder's naming, which has not changed
                trigger_file = f"{TRIGGERS_DIR}/{trigger_stem(index, evidence.name)}.safetensors"
            classes.append(ClassRow(evidence=evidence, reference=ref, trigger_file=trigger_file))
        names = tuple(row.name for row in classes)
        if len(set(names)) != len(names):
            raise DataError(f"{source}: 'classes' names a class twice")
        scorers = []
        if verdict != UNSCANNABLE:
            table = read.child("scorers")
            decider = read.text("scorer")
            order = [decider] + [name for name in table.data if name != decider]
            if decider not in table.data:
                read.fail("scorer", f"one of its scorers {list(table.data)}", decider)
            for name in order:
                legacy = None
                if version == 1:
                    legacy = tuple(JsonFields(r.get("scores"), f"{source}: class {c.name!r}: scores").number(name)
                                   for r, c in zip(rows, classes))
                result = ScorerResult.from_json(table.child(name), names, legacy)
                if result.scorer != name:
                    raise DataError(f"{source}: scorers.{name} says it is scorer {result.scorer!r}")
                scorers.append(result)
            if (BACKDOORED if scorers[0].backdoored else CLEAN) != verdict:
                raise DataError(f"{source}: 'verdict' {verdict!r} disagrees with its deciding scorer {decider!r}, "
                                f"which says {scorers[0].verdict!r}")
            if not classes:
                raise DataError(f"{source}: a {verdict} scan report must hold its classes")
        elif not read.texts("unscannable_reasons"):
            raise DataError(f"{source}: an unscannable report must say why ('unscannable_reasons' is empty)")
        suspect = read.child("suspect", optional=True)
        if suspect is not None:
            if verdict != UNSCANNABLE:
                raise DataError(f"{source}: a {verdict} report has a 'suspect' (only an unscannable one may)")
            suspect = ScorerResult.from_json(suspect, names, None)
        reference = None
        ref_read = read.child("reference", optional=True)
        if ref_read is not None:
            reference = ReferenceInfo(key=ref_read.text("key"), model=ref_read.text("model"),
                                      template=ref_read.text("template"), cached=ref_read.flag("cached"),
                                      seconds=ref_read.number("seconds"))
        bundle = read.child("bundle", optional=True)
        backbone = read.child("backbone", optional=True)
        pool = read.child("pool", optional=True)
        ref_health = read.child("reference_pool_health", optional=True)
        report = cls(
            schema_version=version, verdict=verdict, unscannable_reasons=read.texts("unscannable_reasons", default=[]),
            detector=read.text("detector"), detector_config=read.mapping("detector_config"), scorers=tuple(scorers),
            suspect=suspect,
            classes=tuple(classes), reference=reference, pool_health=health_from_json(read.child("pool_health")),
            reference_pool_health=None if ref_health is None else health_from_json(ref_health),
            seconds=read.number("seconds"),
            bundle=BundleIdentity.from_json(bundle) if bundle is not None else BundleIdentity(path=None, sha256=None),
            backbone=None if backbone is None else BackboneIdentity.from_json(backbone),
            pool=None if pool is None else PoolInfo.from_json(pool), seed=read.integer("seed", optional=True),
            preset=read.text("preset", optional=True), device=read.text("device", optional=True),
            command=read.text("command", optional=True), toolkit_version=read.text("toolkit_version", optional=True),
            created=read.text("created", optional=True))
        if version == SCHEMA_VERSION:
            report.check_derived(data, source)
        return report

    def check_derived(self, data: Mapping[str, Any], source: str) -> None:
        """The figures a report repeats (top-level verdict fields, per-class scores) must be the ones it derives."""
        rebuilt = self.to_json()
        for key, value in rebuilt.items():
            if key == "classes":
                for index, (row, stored) in enumerate(zip(value, data["classes"])):
                    for field in ("score", "scores"):
                        if row.get(field) != stored.get(field):
                            raise DataError(f"{source}: classes[{index}].{field} disagrees with its scorers' "
                                            "per-class scores (an edited report?)")
            elif data.get(key) != value:
                raise DataError(f"{source}: '{key}' is {str(data.get(key))[:60]!r}, but its scorers and classes "
                                f"give {str(value)[:60]!r} (an edited report?)")


_SCHEMA: dict | None = None


def report_schema() -> dict:
    """The JSON Schema of report.json (layout ``SCHEMA_VERSION``), shipped in the package."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return _SCHEMA


def validate_against_schema(data: Any, source: str) -> None:
    """Refuse ``data`` unless it is a report of the current layout, naming the first field that is not."""
    check_schema(data, report_schema(), source, whole="the report",
                 schema_name=f"the scan report schema ({SCHEMA_PATH.name})")


def check_schema(data: Any, schema: dict, source: str, *, whole: str, schema_name: str) -> None:
    """Refuse ``data`` unless it matches ``schema``, naming the first field that does not (``whole``: how the
    message names the document itself)."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        raise DataError(f"{source}: {where or whole} does not match {schema_name}: {error.message[:200]}")


def read_scan_report(path: str | Path) -> ScanReport:
    """The report of a scan folder, or the report.json given itself."""
    path = Path(path)
    report_path = path / REPORT_FILE if path.is_dir() else path
    if not report_path.is_file():
        if path.is_dir() and (path / VERDICT_FILE).is_file():
            raise DataError(f"{path} holds two scans (ci-scan --own-images): read one of them, {path / 'ood'} or "
                            f"{path / 'own'}")
        raise DataError(f"{path}: not a scan report (expected a folder holding {REPORT_FILE}, or the file itself)")
    return ScanReport.from_json(read_json_object(report_path, DataError, "a scan report"), str(report_path))
