"""Entry point of the ``clip_inspector`` group: registers the ``nc`` detector."""

from ci_core import hookimpl
from ci_detectors_nc.detector import NeuralCleanse


@hookimpl
def register_detectors(register):
    register(NeuralCleanse)
