"""Registers the repairers (CI's trigger and the paper's controls), through the same hooks a third party uses."""

from ci_core import hookimpl
from ci_repairers.repairers import REPAIRERS


@hookimpl
def register_repairers(register):
    for repairer in REPAIRERS:
        register(repairer)
