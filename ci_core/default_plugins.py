"""The core's own plugin: the bundled tiny world's datasets, the ten CoOp-layout datasets and the core's two
triggers, additive (CLIP-Inspector's reconstruction, BadCLIP's, an imported BadCLIP trigger) and blend (Blended's
and the blend inversion's), registered like any other plugin classes."""

from ci_core.data.coop import COOP_DATASETS
from ci_core.data.datasets import TINY_DATASETS
from ci_core.hookspecs import hookimpl
from ci_core.triggers import AdditiveTrigger, BlendTrigger


@hookimpl
def register_datasets(register):
    for dataset in (*TINY_DATASETS, *COOP_DATASETS):
        register(dataset)


@hookimpl
def register_triggers(register):
    register(AdditiveTrigger)
    register(BlendTrigger)
