"""Plugin discovery and the registry of everything plugins provide.

Plugins are found through pluggy's own entry-point loading
(``PluginManager.load_setuptools_entrypoints``), which reads the installed
distributions with ``importlib.metadata`` and remembers which distribution each
plugin came from; that is what ``ci-bench plugins`` prints.  We chose it over a
hand-written ``importlib.metadata`` loop because it is the mechanism pytest
uses, it blocks duplicate registrations, and it keeps the distribution info.
A plugin's ImportError is not hidden: a broken plugin stops the program with
its own traceback.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import attrs
import pluggy

from ci_core import hookspecs
from ci_core.errors import DataError, PluginError

if TYPE_CHECKING:
    from ci_core.data.datasets import Dataset
    from ci_core.triggers import Trigger

ENTRY_POINT_GROUP = hookspecs.PROJECT

# kind -> hook that registers it
KINDS = {
    "attack": "register_attacks",
    "detector": "register_detectors",
    "scorer": "register_scorers",
    "repairer": "register_repairers",
    "dataset": "register_datasets",
    "trigger": "register_triggers",
}
# The class attribute a kind is filed under: a trigger's is the kind its files record.
NAME_ATTRIBUTE = {"trigger": "kind"}

# Plugins that live in their own distributions: name the distribution to install.
KNOWN_DISTRIBUTIONS = {
    ("detector", "nc"): "ci-detectors-nc",
    ("detector", "pixb"): "ci-detectors-pixb",
}


@attrs.frozen
class Registered:
    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str


def _base_class(kind: str) -> type:
    # Imported when the registry is first built, not with this module: the interfaces import the models and
    # data, which a plugin registry has no need to load before it is used.
    from ci_core import interfaces

    return {
        "attack": interfaces.Attack,
        "detector": interfaces.Detector,
        "scorer": interfaces.Scorer,
        "repairer": interfaces.Repairer,
        "dataset": interfaces.Dataset,
        "trigger": interfaces.Trigger,
    }[kind]


class Registry:
    """Everything registered by the plugins of one plugin manager, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager):
        dists = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
        self._entries: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            base = _base_class(kind)
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                distribution = dists.get(id(impl.plugin), "(not installed: registered in-process)")

                def register(cls, _impl=impl, _kind=kind, _base=base, _dist=distribution):
                    self._add(_kind, _base, cls, _impl.plugin_name, _dist)

                impl.function(register=register)

    def _add(self, kind: str, base: type, cls: type, plugin: str, distribution: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"plugin {plugin!r} registered {cls!r} as a {kind}, but it is not a subclass of {base.__name__}")
        attribute = NAME_ATTRIBUTE.get(kind, "name")
        name = getattr(cls, attribute, None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r}: {kind} class {cls.__qualname__} has no {attribute!r} class attribute")
        existing = self._entries[kind].get(name)
        if existing is not None and existing.cls is not cls:
            raise PluginError(
                f"{kind} name {name!r} is registered twice: by {existing.cls.__module__}.{existing.cls.__qualname__} "
                f"({existing.distribution}) and by {cls.__module__}.{cls.__qualname__} ({distribution})"
            )
        self._entries[kind][name] = Registered(kind, name, cls, plugin, distribution)

    def names(self, kind: str) -> list[str]:
        return list(self._entries[kind])

    def entries(self) -> Iterable[Registered]:
        for by_name in self._entries.values():
            yield from by_name.values()

    def get(self, kind: str, name: str) -> type:
        entry = self._entries[kind].get(name)
        if entry is None:
            hint = ""
            dist = KNOWN_DISTRIBUTIONS.get((kind, name))
            if dist:
                hint = f" It is provided by the distribution {dist!r}: pip install {dist}"
            available = ", ".join(self.names(kind)) or "none"
            raise PluginError(f"unknown {kind} {name!r}.{hint} Available {kind}s: {available}.")
        return entry.cls


def plugin_manager(load_entrypoints: bool = True, blocked: Iterable[str] = ()) -> pluggy.PluginManager:
    """A plugin manager with every installed plugin, except the entry-point names in ``blocked``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


@functools.cache
def registry() -> Registry:
    """The registry of all installed plugins (built once per process)."""
    return Registry(plugin_manager())


def open_dataset(name: str, data_root: str | Path | None) -> "Dataset":
    """The registered dataset ``name``, reading its files under ``data_root`` if it has any."""
    return registry().get("dataset", name).open(data_root)


def load_trigger(path: str | Path) -> "Trigger":
    """The trigger saved at ``path`` by ``Trigger.save``, as an instance of the registered class its kind names."""
    from ci_core.triggers import read_saved_trigger

    path = Path(path)
    kind, tensors, params = read_saved_trigger(path)
    try:
        cls = registry().get("trigger", kind)
    except PluginError as exc:
        raise DataError(f"{path.with_name(path.name + '.json')}: {exc}") from None
    return cls.from_saved(tensors, params)
