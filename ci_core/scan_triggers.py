"""What a repair takes from a scan: the per-class triggers and scores, and which one a repairer gets.

A scan folder (``report.json`` and ``triggers/NNN_name.safetensors``, written by
``ci_core.scan.write_scan``) or an in-memory ``ScanResult`` becomes a
``ScanTriggers``: the classes, their anomaly scores, the most anomalous class
ĉ, the hash of the bundle that was scanned, and a loader for each class's
trigger.  ``check_same_bundle`` refuses a scan made for other weights.

A repairer says which trigger it needs through an optional method
``choose(triggers: ScanTriggers) -> PickedTrigger | None`` (None: it needs no
trigger); ``choose_trigger`` calls it, and gives a repairer without one the
trigger of ĉ.  The chosen trigger and its class go to ``Repairer.repair`` as
``trigger`` and ``target``.  Nothing here depends on the detector that made the
triggers or on how a repairer uses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import attrs

from ci_core.errors import BundleError, ConfigError, DataError
from ci_core.files import read_json_object
from ci_core.interfaces import Repairer
from ci_core.models.bundle import bundle_sha256
from ci_core.scan import ScanResult
from ci_core.triggers import Trigger
from ci_core.plugins import load_trigger

REPORT_FILE = "report.json"
TRIGGERS_DIR = "triggers"

# How a repairer picks a class's trigger from a scan:
#   top        the scan's most anomalous class ĉ (the report's "target", the highest score);
#   lowest     the class with the lowest score (never ĉ);
#   runner-up  the class with the highest score after ĉ.
PICK_RULES = ("top", "lowest", "runner-up")


# --------------------------------------------------------------------------- the scan's triggers


@attrs.frozen(kw_only=True)
class PickedTrigger:
    """One class's reconstructed trigger, chosen from a scan."""

    name: str
    index: int
    score: float
    trigger: Trigger


@attrs.frozen(kw_only=True, eq=False)
class ScanTriggers:
    """The per-class scores and triggers of one scan; triggers are loaded only when picked."""

    classnames: tuple[str, ...]
    scores: tuple[float, ...]
    target: str  # the scan's most anomalous class ĉ
    bundle_sha256: str | None  # the bundle the scan was made for, when known
    source: str
    load: Callable[[int], Trigger] = attrs.field(repr=False)

    @classmethod
    def from_result(cls, result: ScanResult, bundle_sha256: str | None = None) -> "ScanTriggers":
        """The triggers of an in-memory scan (as a benchmark holds them)."""
        return cls(
            classnames=tuple(e.name for e in result.classes), scores=tuple(result.scores.scores),
            target=result.scores.target, bundle_sha256=bundle_sha256, source="scan in memory",
            load=lambda index: result.classes[index].trigger,
        )

    @classmethod
    def read(cls, path: str | Path) -> "ScanTriggers":
        """The triggers of a scan folder (``report.json`` and ``triggers/NNN_name.safetensors``), or of its report.json."""
        path = Path(path)
        folder = path.parent if path.is_file() else path
        report_path = path if path.is_file() else path / REPORT_FILE
        if not report_path.is_file():
            raise DataError(f"{path}: not a scan report (expected a folder holding {REPORT_FILE}, or the file itself)")
        report = read_json_object(report_path, DataError, "a scan report")
        if report.get("verdict") == "unscannable":
            reasons = "; ".join(str(r) for r in report.get("unscannable_reasons") or [])
            raise DataError(f"{report_path}: the scan could not measure the model ({reasons}), so it reconstructed "
                            "no trigger to repair with")
        rows = report.get("classes")
        if not isinstance(rows, list) or not rows or not all(
                isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("score"), (int, float))
                for r in rows):
            raise DataError(f"{report_path}: expected a scan report with a 'classes' list of {{name, score, ...}} rows")
        names = tuple(r["name"] for r in rows)
        if report.get("target") not in names:
            raise DataError(f"{report_path}: its target {report.get('target')!r} is not one of its classes")
        bundle = report.get("bundle")
        sha = bundle.get("sha256") if isinstance(bundle, dict) else None
        triggers = folder / TRIGGERS_DIR

        def load(index: int) -> Trigger:
            matches = sorted(triggers.glob(f"{index:03d}_*.safetensors"))
            if len(matches) != 1:
                raise DataError(f"{triggers}: expected one trigger file {index:03d}_*.safetensors for class "
                                f"{names[index]!r}, found {len(matches)}")
            return load_trigger(matches[0])

        return cls(classnames=names, scores=tuple(float(r["score"]) for r in rows), target=report["target"],
                   bundle_sha256=sha, source=str(report_path), load=load)

    def pick(self, rule: str) -> PickedTrigger:
        """The trigger chosen by ``rule`` (one of ``PICK_RULES``); ties go to the earlier class."""
        top = self.classnames.index(self.target)
        if rule == "top":
            index = top
        elif rule in ("lowest", "runner-up"):
            others = [i for i in range(len(self.classnames)) if i != top]
            if not others:
                raise DataError(f"{self.source}: the scan has only the class {self.target!r}, so no other class's trigger")
            sign = -1.0 if rule == "lowest" else 1.0
            index = max(others, key=lambda i: (sign * self.scores[i], -i))
        else:
            raise ConfigError(f"unknown trigger choice {rule!r}; expected one of {PICK_RULES}")
        return PickedTrigger(name=self.classnames[index], index=index, score=self.scores[index],
                             trigger=self.load(index))


def choose_trigger(repairer: Repairer, triggers: ScanTriggers) -> PickedTrigger | None:
    """The trigger ``repairer`` asks for (None: it needs none); a repairer without ``choose`` gets ĉ's."""
    choose = getattr(repairer, "choose", None)
    return choose(triggers) if choose is not None else triggers.pick("top")




def check_same_bundle(triggers: ScanTriggers, bundle: str | Path) -> None:
    """Refuse a scan that was made for another model (or that does not say which model it was made for)."""
    if triggers.bundle_sha256 is None:
        raise BundleError(f"{triggers.source} does not record which bundle was scanned (no bundle.sha256), so it "
                          f"cannot be checked against {bundle}; scan the bundle with ci-scan")
    actual = bundle_sha256(bundle)
    if actual != triggers.bundle_sha256:
        raise BundleError(
            f"the scan report {triggers.source} belongs to a different model: it was made for a bundle with sha256 "
            f"{triggers.bundle_sha256[:16]}..., but {bundle} has sha256 {actual[:16]}...; scan this bundle with ci-scan"
        )
