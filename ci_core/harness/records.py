"""What the harness plans and files, typed: cell specs (hashed into keys) and cell records (their results).

A spec holds everything a cell's result depends on; a cell's key is a readable
prefix plus the start of the SHA-256 of the spec's canonical JSON (``spec_hash``).
A record is what a finished cell writes to its ``cell.json``.  Both are frozen
attrs classes that serialise here and nowhere else, to exactly the JSON of store
version 2 (the same field names, optional fields left out when unset), so that
keys stay what they were and stores written since then read back unchanged.
Reading checks every required field and names the file and the field that is
missing or malformed.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import attrs

from ci_core.errors import ConfigError
from ci_core.keys import spec_hash  # noqa: F401 - one key function for the store and the reference cache

# 2: reference cells; each class of a scan draws from its own generator; scorers read at report time; manifests.
VERSION = 2




def _plain(value: Any) -> Any:
    if attrs.has(type(value)):
        return value.to_json()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class JSONRecord:
    """to_json / from_json for the attrs classes below: nested records by their converters, optional fields
    (``OPTIONAL``) left out of the JSON when they hold their default."""

    KIND: ClassVar[str | None] = None  # written as "kind" first, when set
    OPTIONAL: ClassVar[tuple[str, ...]] = ()
    NESTED: ClassVar[Mapping[str, Callable[[Any, str], Any]]] = {}

    def to_json(self) -> dict:
        out = {"kind": self.KIND} if self.KIND else {}
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if field.name in self.OPTIONAL and value == field.default:
                continue
            out[field.name] = _plain(value)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> Any:
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if cls.KIND and data.get("kind", cls.KIND) != cls.KIND:
            raise ConfigError(f"{where}: a {data.get('kind')!r} record, expected {cls.KIND!r}")
        values = {}
        for field in attrs.fields(cls):
            if field.name not in data:
                if field.default is attrs.NOTHING:
                    raise ConfigError(f"{where}: missing {field.name!r}")
                continue
            value = data[field.name]
            convert = cls.NESTED.get(field.name)
            values[field.name] = convert(value, f"{where}.{field.name}") if convert and value is not None else value
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _tuple(value: Any, where: str) -> tuple:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list")
    return tuple(value)


# --------------------------------------------------------------------------- specs


@attrs.frozen(kw_only=True)
class BackboneKey(JSONRecord):
    """A backbone as keys see it: its architecture and the hash of its weights (not where they came from)."""

    name: str
    weights_sha256: str


@attrs.frozen(kw_only=True)
class PoolSpec(JSONRecord):
    """The OOD pool of a scan: its source (with a fingerprint of a folder's files) and sizes, and whether the
    inversion set is OOD images or the dataset's own ('id'), or D and T both are ('id-only'), or both are the
    dataset's images of the scanned classes only ('task')."""

    source: str
    inversion: int
    holdout: int
    inversion_data: str


class Spec(JSONRecord):
    @property
    def hash(self) -> str:
        return spec_hash(self.to_json())


@attrs.frozen(kw_only=True)
class ModelSpec(Spec):
    KIND = "model"
    OPTIONAL = ("control",)
    NESTED = {"backbone": BackboneKey.from_json}

    store_version: int = VERSION
    dataset: str
    seed: int
    shots: int
    test_per_class: int | None
    attack: str
    attack_config: dict
    backdoor: bool
    backbone: BackboneKey
    control: bool = False  # trained on the attack's schedule with its backdoor off


@attrs.frozen(kw_only=True)
class ReferenceSpec(Spec):
    KIND = "reference"
    OPTIONAL = ("dataset",)
    NESTED = {"backbone": BackboneKey.from_json, "pool": PoolSpec.from_json, "classnames": _tuple}

    store_version: int = VERSION
    backbone: BackboneKey
    template: str
    classnames: tuple[str, ...]
    pool: PoolSpec
    seed: int
    detector: str
    detector_config: dict
    dataset: str | None = None  # only when the inversion set is the dataset's own images


@attrs.frozen(kw_only=True)
class ScanSpec(Spec):
    KIND = "scan"
    OPTIONAL = ("classes",)
    NESTED = {"backbone": BackboneKey.from_json, "pool": PoolSpec.from_json}

    store_version: int = VERSION
    model: str  # the model cell's key
    seed: int
    candidates: int  # at most this many candidate classes (the paper's 50)
    classes: str = "all"  # drawn from every class, or from the base classes ("base"); see protocol.scan_candidates
    detector: str
    detector_config: dict
    pool: PoolSpec
    backbone: BackboneKey


@attrs.frozen(kw_only=True)
class RepairScoring(JSONRecord):
    """How a repair's class ĉ is chosen: the deciding scorer, its config, and the reference it reads."""

    scorer: str
    config: dict
    reference: str | None


@attrs.frozen(kw_only=True)
class RepairSpec(Spec):
    KIND = "repair"
    NESTED = {"backbone": BackboneKey.from_json, "scoring": RepairScoring.from_json}

    store_version: int = VERSION
    model: str
    scan: str
    seed: int
    repairer: str
    repairer_config: dict
    repair_shots: int
    backbone: BackboneKey
    scoring: RepairScoring


@attrs.frozen(kw_only=True)
class FloorSpec(Spec):
    """A backdoored model's own trigger measured on a clean model of the same dataset: what that trigger does to a
    model with no backdoor, the level below which no repair of the prompt can be asked to bring it."""

    KIND = "floor"
    NESTED = {"backbone": BackboneKey.from_json}

    store_version: int = VERSION
    model: str  # the backdoored model cell's key: its trigger, target and test images
    clean_model: str  # the clean model cell's key
    backbone: BackboneKey


SPECS = {cls.KIND: cls for cls in (ModelSpec, ReferenceSpec, ScanSpec, RepairSpec, FloorSpec)}


def spec_from_json(data: Any, where: str = "spec") -> Spec:
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind not in SPECS:
        raise ConfigError(f"{where}: unknown cell kind {kind!r}; expected one of {sorted(SPECS)}")
    return SPECS[kind].from_json(data, where)


# --------------------------------------------------------------------------- records (cell.json)


@attrs.frozen(kw_only=True)
class Record(JSONRecord):
    """What every finished cell records besides its own results: its key, and where and how long it ran."""

    key: str
    label: str
    seconds: float = 0.0
    cpu_seconds: float | None = None
    device: str = ""
    threads: int | None = None


@attrs.frozen(kw_only=True)
class ModelRecord(Record):
    KIND = "model"
    NESTED = {"spec": ModelSpec.from_json}

    spec: ModelSpec
    dataset: str
    attack: str
    seed: int
    target: str | None  # the backdoor's target; None for clean models and controls
    metrics: dict  # ACC and ASR on base and new classes, trigger SSIM (ci_core.learning.evaluation.AttackMetrics)
    trigger: str | None  # the ground-truth trigger's kind
    bundle_sha256: str
    base_classes: list = attrs.Factory(list)
    new_classes: list = attrs.Factory(list)
    control: bool = False
    control_target: str | None = None  # whose trigger a control's ASR was measured with
    log: dict = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class ReferenceRecord(Record):
    KIND = "reference"
    NESTED = {"spec": ReferenceSpec.from_json}

    spec: ReferenceSpec
    reference_key: str  # the reference scan's own key (ci_core.scanning.reference: what a cache would file it under)
    pool_sha256: str
    detector: str
    n_classes: int
    scan_seconds: float


@attrs.frozen(kw_only=True)
class ScanRecord(Record):
    KIND = "scan"
    NESTED = {"spec": ScanSpec.from_json}

    spec: ScanSpec
    model: str
    reference: str | None
    dataset: str
    attack: str
    seed: int
    true_target: str | None
    detector: str
    variant: dict  # the ablation values: pool size, holdout, batch size, loss, inversion data
    n_classes: int
    scan_seconds: float
    control: bool = False
    pool_sha256: str = ""
    # The verdict with the plan's scorers, when the scan ran (``ci-bench report`` scores the evidence again).
    scoring: dict = attrs.Factory(dict)
    verdict: str | None = None
    scorer: str | None = None
    backdoored: bool | None = None
    s_max: float | None = None
    p_value: float | None = None
    predicted_target: str | None = None
    flagged: list = attrs.Factory(list)
    paper_scorer: str | None = None
    paper_s_max: float | None = None
    paper_flagged: bool | None = None


@attrs.frozen(kw_only=True)
class RepairRecord(Record):
    KIND = "repair"
    NESTED = {"spec": RepairSpec.from_json}

    spec: RepairSpec
    model: str
    scan: str
    dataset: str
    attack: str
    seed: int
    repairer: str
    true_target: str | None
    scan_target: str  # ĉ, the scan's most anomalous class by the repair's scorer
    repair_trigger_class: str | None  # whose reconstructed trigger the repairer used (None: it takes none)
    clean_images: int
    before: dict  # the model cell's own evaluation
    after: dict  # the repaired model's, by the same code on the same test images
    bundle_sha256: str
    repair_seconds: float
    repair_cpu_seconds: float | None = None


@attrs.frozen(kw_only=True)
class FloorRecord(Record):
    KIND = "floor"
    NESTED = {"spec": FloorSpec.from_json}

    spec: FloorSpec
    model: str
    clean_model: str
    dataset: str
    attack: str
    seed: int
    clean_seed: int
    target: str
    metrics: dict  # the clean model's ACC and the backdoored model's trigger's ASR on it (evaluation.AttackMetrics)


RECORDS = {cls.KIND: cls for cls in (ModelRecord, ReferenceRecord, ScanRecord, RepairRecord, FloorRecord)}
