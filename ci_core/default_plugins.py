"""The core's own plugin: the bundled tiny world's datasets and the ten CoOp-layout datasets,
registered like any other dataset."""

from ci_core.data.coop import COOP_DATASETS
from ci_core.data.datasets import TINY_DATASETS
from ci_core.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    for dataset in (*TINY_DATASETS, *COOP_DATASETS):
        register(dataset)
