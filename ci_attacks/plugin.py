"""Registers the first-party attacks, through the same hooks a third party uses."""

from ci_attacks.badclip import BadCLIP
from ci_attacks.clean import CleanPromptTuning
from ci_core import hookimpl


@hookimpl
def register_attacks(register):
    register(CleanPromptTuning)
    register(BadCLIP)
