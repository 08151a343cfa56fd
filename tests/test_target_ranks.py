"""benchmarks/target_ranks.py: where a backdoor's true target stands in one scan, as the miss analyses read it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ci_core.scanning.scan import UNSCANNABLE

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def ranks():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports paired_scans beside it, as it does when run
    try:
        spec = importlib.util.spec_from_file_location("target_ranks", BENCHMARKS / "target_ranks.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def scan(class_p, target="red cross", verdict="backdoored", predicted=None, suspect_p=None, problems=()):
    return SimpleNamespace(class_p=class_p, true_target=target, verdict=verdict, predicted_target=predicted,
                           suspect_p=suspect_p, problems=problems)


def test_the_target_is_ranked_by_its_p_among_the_candidates(ranks):
    line = ranks.target_standing(scan({"red ring": 0.016, "red cross": 0.11, "blue ring": 0.4}))
    assert line == "rank 2/3 p 0.11; top 'red ring' p 0.016"


def test_a_target_outside_the_candidates_is_said_so(ranks):
    line = ranks.target_standing(scan({"red ring": 0.2, "blue ring": 0.5}))
    assert line == "target not a candidate of 2 classes; top 'red ring' p 0.2"


def test_an_unscannable_scan_gives_its_suspect_and_why(ranks):
    why = ("22% of the OOD pool's images give non-finite logits",)
    line = ranks.target_standing(scan(None, verdict=UNSCANNABLE, predicted="red cross", suspect_p=0.0042,
                                      problems=why))
    assert line == f"unscannable, suspect 'red cross' p 0.0042 ({why[0]})"
    cut = ranks.target_standing(scan(None, verdict=UNSCANNABLE, problems=("x" * 200,)))
    assert cut.startswith("unscannable, no suspect (") and cut.endswith("...)") and len(cut) < 160
