"""Helpers for the tests of plugin distributions: make a source folder look installed, or an installed one absent.

``source_distribution(folder)`` makes a plugin distribution's source folder look installed in this process (the
name, version and entry points of its pyproject.toml, through a substituted ``importlib.metadata.distributions``,
and the folder on ``sys.path``), so that its tests run without ``pip install``; ``hidden_distribution(name)``
makes an installed one look absent; ``registered_by(dist)`` lists the registry entries a distribution made.
As pytest's own tests fake installed distributions, these substitute ``importlib.metadata.distributions``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

from ci_core.plugins import ENTRY_POINT_GROUP, Registered, registry


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib
    with path.open("rb") as handle:
        return tomllib.load(handle)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _SourceDistribution(importlib.metadata.Distribution):
    """The metadata pip would install for a source folder, read from its pyproject.toml."""

    def __init__(self, folder: Path):
        project = _read_toml(folder / "pyproject.toml")["project"]
        groups = dict(project.get("entry-points", {}))
        if project.get("scripts"):
            groups["console_scripts"] = project["scripts"]
        self.folder = folder
        self._files = {
            "METADATA": f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
                        f"Summary: {project.get('description', '')}\n",
            "entry_points.txt": "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) + "\n"
                                        for group, points in groups.items()),
        }

    def read_text(self, filename):
        return self._files.get(str(filename))

    def locate_file(self, path):
        return self.folder / path

    def packages(self) -> set[str]:
        """The top-level modules its entry points name."""
        return {ep.value.split(":")[0].split(".")[0] for ep in self.entry_points}


@contextlib.contextmanager
def _distributions(transform: Callable[[list], list]) -> Iterator[None]:
    """``importlib.metadata.distributions`` (what pluggy reads entry points from) through ``transform``."""
    original = importlib.metadata.distributions

    def distributions(**kwargs):
        found = list(original(**kwargs))
        return iter(transform(found) if not kwargs else found)

    importlib.metadata.distributions = distributions
    registry.cache_clear()
    try:
        yield
    finally:
        importlib.metadata.distributions = original
        registry.cache_clear()


@contextlib.contextmanager
def hidden_distribution(name: str) -> Iterator[None]:
    """In this process, the distribution ``name`` looks absent to plugin discovery (installed, faked or not)."""
    wanted = _normalise(name)
    with _distributions(lambda found: [d for d in found if _normalise(d.metadata["Name"] or "") != wanted]):
        yield


@contextlib.contextmanager
def source_distribution(folder: str | Path) -> Iterator[importlib.metadata.Distribution]:
    """In this process, the plugin distribution in ``folder`` looks installed from that folder, as pip would
    install it: its pyproject's name, version and entry points (the ``clip_inspector`` group among them) are
    discovered through ``importlib.metadata.distributions`` (an installed copy of the same name is hidden),
    and its modules are imported from ``folder``.  On exit the modules it imported are forgotten and any
    imported before are restored.  Yields the distribution (``.metadata``, ``.version``, ``.entry_points``).
    Child processes do not see it."""
    folder = Path(folder).resolve()
    dist = _SourceDistribution(folder)
    wanted = _normalise(dist.metadata["Name"])
    packages = tuple(dist.packages())
    owned = lambda module: module.split(".")[0] in packages  # noqa: E731
    earlier = {name: module for name, module in sys.modules.items() if owned(name)}
    for name in earlier:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        with _distributions(lambda found: [dist] + [d for d in found
                                                    if _normalise(d.metadata["Name"] or "") != wanted]):
            yield dist
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if owned(name)]:
            del sys.modules[name]
        sys.modules.update(earlier)


def registered_by(dist: importlib.metadata.Distribution) -> list[Registered]:
    """The registry entries that ``dist``'s ``clip_inspector`` entry points registered."""
    plugins = {ep.name for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP}
    return [entry for entry in registry().entries() if entry.plugin in plugins]
