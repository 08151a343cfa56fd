"""What a repair takes from a scan: the per-class triggers and scores, and which one a repairer gets.

A scan folder (``report.json`` and ``triggers/NNN_name.safetensors``, written by
``ci_core.pages.scan_output.write_scan`` and read through ``ScanReport``) or an in-memory ``ScanResult`` becomes a
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
from ci_core.interfaces import Repairer
from ci_core.models.bundle import bundle_sha256
from ci_core.scanning.scan import BACKDOORED, UNSCANNABLE, ScanResult
from ci_core.scanning.scan_report import REPORT_FILE, TRIGGERS_DIR, read_scan_report
from ci_core.scanning.two_scan_report import OWN_SCAN, VERDICT_FILE, is_two_scan_folder, read_two_scan_verdict
from ci_core.triggers import Trigger
from ci_core.plugins import load_trigger


# How a repairer picks a class's trigger from a scan:
#   top        the scan's most anomalous class ĉ (the report's "target", the highest score);
#   lowest     the class with the lowest score (never ĉ);
#   runner-up  the class with the highest score after ĉ.
PICK_RULES = ("top", "lowest", "runner-up")


# --------------------------------------------------------------------------- the scan's triggers


class UnscannableScan(DataError):
    """A scan report of a model the scan could not measure: it holds no trigger to repair with."""

    def __init__(self, source: str, reasons: tuple[str, ...]):
        self.reasons = reasons
        super().__init__(f"{source}: the scan could not measure the model ({'; '.join(reasons)}), "
                         "so it reconstructed no trigger to repair with")


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
    # The deciding scorer's verdict: whether the scan found the model backdoored, and its p-value where it has one.
    backdoored: bool = True
    p_value: float | None = None
    verdict: str | None = None  # where it is not 'clean' or 'backdoored' (an unscannable scan or pair)
    # An unscannable scan that still measured every class on the images the model gave finite logits on: why it is
    # unscannable, and the p of its suspect (the class ``target`` names; ScanResult.suspect).
    reasons: tuple[str, ...] = ()
    suspect_p: float | None = None

    @classmethod
    def from_result(cls, result: ScanResult, bundle_sha256: str | None = None) -> "ScanTriggers":
        """The triggers of an in-memory scan (as a benchmark holds them)."""
        return cls(
            classnames=tuple(e.name for e in result.classes), scores=tuple(result.scores.scores),
            target=result.scores.target, bundle_sha256=bundle_sha256, source="scan in memory",
            load=lambda index: result.classes[index].trigger, backdoored=bool(result.scores.backdoored),
            p_value=result.scores.p_value,
        )

    @classmethod
    def read(cls, path: str | Path) -> "ScanTriggers":
        """The triggers of a scan folder (``report.json`` and its trigger files), or of its report.json.

        A ``ci-scan --own-images`` folder gives the triggers of its scan on the auditor's own images (``own/``),
        judged by the pair's verdict; the OOD scan's where the own scan could not measure the model.  A pair read
        by the paired test takes the trigger of the class it names.  The own
        scan's trigger repaired more working backdoors on issue 25's fifth confirmation (docs/repair.md).
        """
        path = Path(path)
        if is_two_scan_folder(path):
            pair = read_two_scan_verdict(path)
            measured = [s["name"] for s in pair["scans"] if s["verdict"] != UNSCANNABLE]
            # Neither scan measured the model as a whole: a scan that measured every class on the images it did not
            # break on (its suspect) still holds a trigger per class, the own scan's first.
            readable = measured or [s["name"] for s in pair["scans"] if s.get("target") is not None]
            if not readable:
                raise UnscannableScan(str(path / VERDICT_FILE), ("neither of its two scans could measure the model",))
            name = OWN_SCAN if OWN_SCAN in readable else readable[0]
            chosen = cls.read(path / name)
            why = "the scan on your own images" if name == OWN_SCAN else "the own scan could not measure the model"
            if not measured:
                why += ", its suspect: neither scan could measure the model as a whole"
            if pair.get("combination") == "paired" and pair["target"] in chosen.classnames:
                # The paired test names the class easy to reach in both scans: that class's trigger, not the top
                # class of one scan alone.
                chosen = attrs.evolve(chosen, target=pair["target"])
                why += ", for the class the paired test names"
            return attrs.evolve(chosen, backdoored=pair["verdict"] == BACKDOORED, p_value=pair["p_value"],
                                verdict=pair["verdict"], source=f"{path} (its {name} scan: {why})")
        folder = path.parent if path.is_file() else path
        report = read_scan_report(path)
        source = str(folder / REPORT_FILE) if not path.is_file() else str(path)
        named = report.decision or report.suspect  # unscannable yet every class measured: its suspect's reading
        if named is None:
            raise UnscannableScan(source, tuple(report.unscannable_reasons))
        if not report.classes:
            raise DataError(f"{source}: expected a scan report with at least one class")
        names = report.classnames

        def load(index: int) -> Trigger:
            relative = report.classes[index].trigger_file
            if relative is None or not (folder / relative).is_file():
                raise DataError(f"{folder / TRIGGERS_DIR}: no trigger file {relative} for class {names[index]!r}")
            return load_trigger(folder / relative)

        judged = (dict(backdoored=named.backdoored, p_value=named.p_value) if report.decision is not None else
                  dict(backdoored=False, verdict=UNSCANNABLE, reasons=tuple(report.unscannable_reasons),
                       suspect_p=named.p_value))
        return cls(classnames=names, scores=named.scores, target=named.target, bundle_sha256=report.bundle.sha256,
                   source=source, load=load, **judged)

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


def check_flagged(triggers: ScanTriggers, *, force: bool) -> None:
    """Refuse to repair a model its scan found clean, unless ``force``: its top class is then no backdoor's target."""
    if triggers.backdoored or force:
        return
    p = "" if triggers.p_value is None else f", p = {triggers.p_value:.3g}"
    if triggers.reasons:
        suspect = "" if triggers.suspect_p is None else f", p = {triggers.suspect_p:.3g}"
        raise ConfigError(f"{triggers.source}: the scan could not measure the model as a whole "
                          f"({'; '.join(triggers.reasons)}), so it is judged unscannable, not backdoored; on the "
                          f"images it did not break on, its most anomalous class is {triggers.target!r}{suspect}. "
                          "Do not deploy a model the scan cannot measure; pass --force to fine-tune it with that "
                          "class's trigger anyway")
    if triggers.verdict == UNSCANNABLE:
        raise ConfigError(f"{triggers.source}: one scan could not measure the model and the other flags no class "
                          f"(its most anomalous class {triggers.target!r}{p}), so no backdoor was found to repair; "
                          "pass --force to fine-tune it with that class's trigger anyway")
    raise ConfigError(f"{triggers.source}: the scan found this model clean (its most anomalous class "
                      f"{triggers.target!r}{p}), so there is no backdoor to repair; pass --force to fine-tune it with "
                      "that class's trigger anyway")


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
