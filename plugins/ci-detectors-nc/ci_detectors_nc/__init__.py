"""Neural Cleanse as a clip-inspector detector plugin (``nc``), with its mask-and-pattern trigger."""

from ci_detectors_nc.detector import NeuralCleanse, NeuralCleanseConfig
from ci_detectors_nc.schedule import CostSchedule, StepOutcome
from ci_detectors_nc.trigger import MaskPatternTrigger

__all__ = ["CostSchedule", "MaskPatternTrigger", "NeuralCleanse", "NeuralCleanseConfig", "StepOutcome"]
