"""Registers CLIP-Inspector and the scorers, through the same hooks a third party uses."""

from ci_core import hookimpl
from ci_detectors.blend import BlendInspector
from ci_detectors.inspector import CLIPInspector
from ci_detectors.mad import MADScorer
from ci_detectors.reference_scoring import ReferenceOutlierScorer
from ci_detectors.scoring import CIScorer


@hookimpl
def register_detectors(register):
    register(CLIPInspector)
    register(BlendInspector)


@hookimpl
def register_scorers(register):
    register(CIScorer)
    register(MADScorer)
    register(ReferenceOutlierScorer)

