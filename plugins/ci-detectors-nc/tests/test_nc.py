"""ci-detectors-nc's own tests: it registers through the ``clip_inspector`` entry points, and Neural Cleanse and
its mask-and-pattern trigger, resolved through them, pass their contracts (``ci_core.contracts``).

The distribution under test is this folder, whether or not it is pip-installed: ``source_distribution``
makes it look installed from here (its pyproject's name, version and entry points) and installs nothing.
Run from the repository root (``pytest`` takes these tests too) or as ``pytest plugins/ci-detectors-nc``.
"""

import sys
from pathlib import Path

import pytest

from ci_core import contracts, testing
from ci_core.plugins import registry

FOLDER = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def distribution():
    with testing.source_distribution(FOLDER) as dist:
        yield dist


def test_it_registers_through_clip_inspector_entry_points(distribution):
    assert distribution.metadata["Name"] == "ci-detectors-nc"
    assert [(ep.group, ep.name, ep.value) for ep in distribution.entry_points] == [
        ("clip_inspector", "ci_detectors_nc", "ci_detectors_nc.plugin")]
    entries = {(e.kind, e.name): e for e in testing.registered_by(distribution)}
    assert set(entries) == {("detector", "nc"), ("trigger", "mask-pattern")}
    assert {e.distribution for e in entries.values()} == {f"ci-detectors-nc {distribution.version}"}
    assert entries[("detector", "nc")].cls.__module__ == "ci_detectors_nc.detector"
    assert entries[("trigger", "mask-pattern")].cls.__module__ == "ci_detectors_nc.trigger"
    assert Path(sys.modules["ci_detectors_nc"].__file__).is_relative_to(FOLDER)  # this folder's code


def test_nc_passes_the_detector_contract():
    contracts.check_detector(registry().get("detector", "nc"))


def test_its_trigger_passes_the_trigger_contract():
    kind = registry().get("trigger", "mask-pattern")
    contracts.check_trigger(contracts.produced_trigger(kind))  # as nc reconstructs one
