"""Entry point of the ``clip_inspector`` group: registers the ``pixb`` detector."""

from ci_core import hookimpl
from ci_detectors_pixb.detector import PixelBackdoor


@hookimpl
def register_detectors(register):
    register(PixelBackdoor)
