"""Entry point of the ``clip_inspector`` group: registers the ``nc`` detector and its mask-and-pattern trigger."""

from ci_core import hookimpl
from ci_detectors_nc.detector import NeuralCleanse
from ci_detectors_nc.trigger import MaskPatternTrigger


@hookimpl
def register_detectors(register):
    register(NeuralCleanse)


@hookimpl
def register_triggers(register):
    register(MaskPatternTrigger)
