"""Hook specifications: how a plugin adds attacks, detectors, scorers, repairers, datasets and trigger kinds.

Each hook receives a ``register`` callback; call it once per class you provide.
A class is filed under its ``name`` class attribute.  A plugin is any module
listed in the ``clip_inspector`` entry-point group of an installed distribution:

    [project.entry-points.clip_inspector]
    my_attacks = "my_package.plugin"

and ``my_package/plugin.py`` holds::

    from ci_core import hookimpl

    @hookimpl
    def register_attacks(register):
        register(MyAttack)

The first-party attacks and detectors of this repository register exactly so.
"""

import pluggy

PROJECT = "clip_inspector"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_attacks(register):
    """Register ``ci_core.Attack`` subclasses: ``register(cls)``."""


@hookspec
def register_detectors(register):
    """Register ``ci_core.Detector`` subclasses: ``register(cls)``."""


@hookspec
def register_scorers(register):
    """Register ``ci_core.Scorer`` subclasses: ``register(cls)``."""


@hookspec
def register_repairers(register):
    """Register ``ci_core.Repairer`` subclasses: ``register(cls)``."""


@hookspec
def register_datasets(register):
    """Register ``ci_core.Dataset`` subclasses: ``register(cls)``."""


@hookspec
def register_triggers(register):
    """Register ``ci_core.Trigger`` subclasses, filed under their ``kind``: ``register(cls)``.

    A trigger saved to a file records its kind; loading it finds the class here, so an attack or
    detector that returns a trigger of its own registers its class too.
    """
