"""Candidate classes of a benchmark scan: 50 labels drawn by a seed, the backdoor target always among them."""

import pytest

from ci_core.errors import ConfigError
from ci_core.learning.protocol import BENCHMARK_CANDIDATES, sample_candidates

CLASSES = tuple(f"class {i:03d}" for i in range(200))


def test_the_papers_count_is_fifty():
    assert BENCHMARK_CANDIDATES == 50


def test_fifty_labels_with_the_target_in_the_class_order():
    picked = sample_candidates(CLASSES, seed=3, target="class 150")
    assert len(picked) == 50 and len(set(picked)) == 50
    assert "class 150" in picked
    assert list(picked) == sorted(picked, key=CLASSES.index)  # the order of the class list
    assert picked == sample_candidates(CLASSES, seed=3, target="class 150")
    assert picked != sample_candidates(CLASSES, seed=4, target="class 150")


def test_the_target_is_included_for_every_seed_and_the_rest_varies():
    seen = set()
    for seed in range(30):
        picked = sample_candidates(CLASSES, seed=seed, target="class 007")
        assert "class 007" in picked and len(picked) == 50
        seen.update(picked)
    assert len(seen) > 190  # 30 draws of 49 from 199 labels leave almost none out


def test_a_clean_model_draws_fifty_at_random():
    picked = sample_candidates(CLASSES, seed=1)
    assert len(picked) == 50 and set(picked) <= set(CLASSES)


def test_small_class_sets_are_returned_whole():
    few = CLASSES[:36]
    assert sample_candidates(few, seed=5, target="class 003") == few
    assert sample_candidates(CLASSES[:50], seed=5) == CLASSES[:50]
    assert len(sample_candidates(CLASSES[:51], seed=5)) == 50
    three = sample_candidates(CLASSES, seed=0, target="class 010", count=3)
    assert len(three) == 3 and "class 010" in three


def test_bad_input():
    with pytest.raises(ConfigError, match=r"target 'nope' is not one of the 200 classes"):
        sample_candidates(CLASSES, seed=0, target="nope")
    with pytest.raises(ConfigError, match=r"names \['a'\] more than once"):
        sample_candidates(["a", "b", "a"], seed=0)
    with pytest.raises(ConfigError, match="at least 2"):
        sample_candidates(CLASSES, seed=0, count=1)
