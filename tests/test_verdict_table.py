"""The report's verdict table counts every backdoor whose trigger works (issue 21), seen-only ones included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ci_core.harness.report.tables import verdict_summary


def row(target, asr_seen, asr_unseen, flagged, top, s_max):
    """A scored scan with just what the verdict table reads."""
    works = lambda level: target is not None and max(asr_seen or 0.0, asr_unseen or 0.0) >= level  # noqa: E731
    implanted = lambda level: target is not None and (asr_unseen or 0.0) >= level  # noqa: E731
    return SimpleNamespace(true_target=target, backdoored=flagged, predicted_target=top, s_max=s_max,
                           verdict="backdoored" if flagged else "clean", rule="p <= 0.01", works=works,
                           implanted=implanted)


def test_seen_only_backdoors_count_as_working_and_their_misses_show():
    rows = [
        row(None, None, None, False, "a", 0.5), row(None, None, None, True, "b", 3.0),  # clean: one false alarm
        row("t", 0.99, 0.90, True, "t", 5.0),    # works everywhere, caught, target named
        row("t", 1.00, 0.03, False, "u", 1.0),   # works on the seen classes only, missed, wrong class on top
        row("t", 0.70, 0.20, True, "t", 4.0),    # seen only, caught
        row("t", 0.10, 0.05, False, "t", 0.2),   # does not work anywhere
    ]
    v = verdict_summary(rows)
    pops = v["populations"]
    assert (v["clean"], v["false_positives"], v["works"], v["implanted"], v["backdoored"]) == (2, 1, 3, 1, 4)
    assert (pops["works"]["models"], pops["works"]["flagged"], pops["works"]["target_named"]) == (3, 2, 2)
    assert pops["works"]["tpr"] == pytest.approx(2 / 3)
    assert (pops["unseen"]["models"], pops["unseen"]["flagged"]) == (1, 1)
    assert (pops["seen_only"]["models"], pops["seen_only"]["flagged"], pops["seen_only"]["target_named"]) == (2, 1, 1)
    assert (pops["all"]["models"], pops["all"]["flagged"], pops["all"]["target_named"]) == (4, 2, 3)
    # The old columns stay: TPR over unseen-implanted models only hides the seen-only miss.
    assert v["tpr"] == 1.0 and v["target_accuracy"] == 1.0
    # AUROC over clean + works: pairs (clean 0.5, 3.0) x (works 5.0, 1.0, 4.0): 5 of 6 ordered (1.0 < 3.0).
    assert v["auroc_works"] == pytest.approx(5 / 6)
    assert v["auroc_implanted"] == pytest.approx(1.0)
