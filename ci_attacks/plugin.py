"""Registers the first-party attacks, through the same hooks a third party uses."""

from ci_attacks.badclip import BadCLIP
from ci_attacks.badclip_adaptive import BadCLIPAdaptive
from ci_attacks.blended import Blended
from ci_attacks.clean import CleanPromptTuning
from ci_attacks.encoder_blended import EncoderBlended, PatternBlendTrigger
from ci_attacks.siba import SIBA, MaskedAdditiveTrigger
from ci_attacks.tripwire import Tripwire
from ci_attacks.wanet import WaNet, WarpTrigger
from ci_core import hookimpl


@hookimpl
def register_attacks(register):
    register(CleanPromptTuning)
    register(BadCLIP)
    register(BadCLIPAdaptive)
    register(Blended)
    register(WaNet)
    register(SIBA)
    register(EncoderBlended)
    register(Tripwire)


@hookimpl
def register_triggers(register):
    for trigger in (WarpTrigger, MaskedAdditiveTrigger, PatternBlendTrigger):
        register(trigger)
