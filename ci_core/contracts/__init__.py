"""Plugin contracts: what every attack, detector, scorer, repairer, dataset and trigger must do, checked by running it.

As timm runs every registered model through forward and backward, one function per kind runs a plugin
class for real, on the tiny CLIP's architecture with random weights and a few classes, and checks its
outputs' types, shapes and invariants:

    check_attack(cls)      check_detector(cls)    check_scorer(cls)
    check_repairer(cls)    check_dataset(cls, data_root=None)
    check_trigger(trigger)                         # an instance: triggers need constructor arguments
    check_entry(entry, ...)                        # a registry entry (ci_core.plugins.Registered) of any kind

Each raises ``ContractViolation`` (an ``AssertionError``) that names the plugin and the clause it
broke.  The clauses are written out in each function's docstring.  Runs are tiny: two or three
classes of two random images, one epoch, one or two optimiser steps.  A plugin runs on its "tiny"
preset with ``small_options`` on top (epochs, warm-up and batch sizes shrunk through the Config fields
it has); a plugin whose fields are named otherwise passes its own ``options``.  A plugin
distribution's tests call these on the class its entry point registered::

    from ci_core.contracts import check_detector
    from ci_core.plugins import registry

    def test_contract():
        check_detector(registry().get("detector", "my-detector"))

A trigger class is checked on an instance: ``produced_trigger(cls)`` finds one by running the
registered detectors and attacks until one returns a trigger of that class (and ``check_attack`` and
``check_detector`` check every trigger they are given back).  This module imports no plugin: it reaches
the others through the registry.

One module per kind (``attack``, ``detector``, ``scorer``, ``repairer``, ``dataset``, ``trigger``) over
``common`` (the tiny inputs and the clauses every plugin class shares); this package's face re-exports them.
The helpers that make a plugin distribution's source folder look installed (``source_distribution``,
``hidden_distribution``, ``registered_by``) live in ``ci_core.testing``; they are re-exported here for the
plugin test suites that import them from this module.
"""

from ci_core.contracts.attack import check_attack
from ci_core.contracts.common import (ContractViolation, check_plugin_class, labeled_images, random_backbone,
                                      random_images, small_options)
from ci_core.contracts.dataset import check_dataset
from ci_core.contracts.detector import check_detector
from ci_core.contracts.entry import check_entry
from ci_core.contracts.repairer import check_repairer
from ci_core.contracts.scorer import check_scorer
from ci_core.contracts.trigger import check_trigger, produced_trigger
from ci_core.testing import hidden_distribution, registered_by, source_distribution

__all__ = [
    "ContractViolation", "check_attack", "check_dataset", "check_detector", "check_entry", "check_plugin_class",
    "check_repairer", "check_scorer", "check_trigger", "hidden_distribution", "labeled_images", "produced_trigger",
    "random_backbone", "random_images", "registered_by", "small_options", "source_distribution",
]
