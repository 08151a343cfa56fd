"""ci-detectors-pixb's own tests: it registers through the ``clip_inspector`` entry points, and Pixel Backdoor,
resolved through them, passes the detector contract (``ci_core.contracts``).

The distribution under test is this folder, whether or not it is pip-installed: ``source_distribution``
makes it look installed from here (its pyproject's name, version and entry points) and installs nothing.
Run from the repository root (``pytest`` takes these tests too) or as ``pytest plugins/ci-detectors-pixb``.
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
    assert distribution.metadata["Name"] == "ci-detectors-pixb"
    assert [(ep.group, ep.name, ep.value) for ep in distribution.entry_points] == [
        ("clip_inspector", "ci_detectors_pixb", "ci_detectors_pixb.plugin")]
    entries = {(e.kind, e.name): e for e in testing.registered_by(distribution)}
    assert set(entries) == {("detector", "pixb")}  # its trigger is the core's additive one
    assert entries[("detector", "pixb")].distribution == f"ci-detectors-pixb {distribution.version}"
    assert entries[("detector", "pixb")].cls.__module__ == "ci_detectors_pixb.detector"
    assert Path(sys.modules["ci_detectors_pixb"].__file__).is_relative_to(FOLDER)  # this folder's code


def test_pixb_passes_the_detector_contract():
    contracts.check_detector(registry().get("detector", "pixb"))
