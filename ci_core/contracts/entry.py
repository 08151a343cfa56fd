"""The contract of any registry entry: ``check_entry`` dispatches on its kind.
"""

from __future__ import annotations

from pathlib import Path

from ci_core.contracts.attack import check_attack
from ci_core.contracts.common import ContractViolation
from ci_core.contracts.dataset import check_dataset
from ci_core.contracts.detector import check_detector
from ci_core.contracts.repairer import check_repairer
from ci_core.contracts.scorer import check_scorer
from ci_core.contracts.trigger import check_trigger, produced_trigger
from ci_core.models.backbone import Backbone
from ci_core.plugins import Registered
from ci_core.triggers import Trigger


def check_entry(entry: Registered, *, backbone: Backbone | None = None, data_root: str | Path | None = None,
                trigger: Trigger | None = None) -> None:
    """The contract of a registry entry's kind, on its class; a trigger's on ``trigger``, an instance of it
    (default: one from ``produced_trigger``)."""
    if entry.kind == "attack":
        check_attack(entry.cls, backbone=backbone)
    elif entry.kind == "detector":
        check_detector(entry.cls, backbone=backbone)
    elif entry.kind == "scorer":
        check_scorer(entry.cls)
    elif entry.kind == "repairer":
        check_repairer(entry.cls, backbone=backbone)
    elif entry.kind == "dataset":
        check_dataset(entry.cls, data_root=data_root)
    elif entry.kind == "trigger":
        if trigger is not None and type(trigger) is not entry.cls:
            raise ContractViolation(f"trigger {entry.name!r}: the instance to check is a {type(trigger).__qualname__}")
        check_trigger(trigger if trigger is not None else produced_trigger(entry.cls, backbone=backbone))
    else:
        raise ContractViolation(f"{entry.kind} {entry.name!r}: no contract for kind {entry.kind!r}")
