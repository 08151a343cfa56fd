"""CLIP-Inspector core: interfaces, hooks, models, data, scanning.  Imports no plugin."""

from ci_core.errors import BundleError, CIError, ConfigError, DataError, PluginError
from ci_core.hookspecs import hookimpl
from ci_core.interfaces import (
    Attack,
    AttackOutcome,
    ClassEvidence,
    Detector,
    Inversion,
    Repairer,
    Scorer,
    Scores,
)
from ci_core.data.datasets import Dataset, LabeledImages
from ci_core.triggers import AdditiveTrigger, Trigger

__all__ = [
    "AdditiveTrigger", "Attack", "AttackOutcome", "BundleError", "CIError", "ClassEvidence", "ConfigError",
    "DataError", "Dataset", "Detector", "Inversion", "LabeledImages", "PluginError", "Repairer", "Scorer",
    "Scores", "Trigger", "hookimpl",
]
