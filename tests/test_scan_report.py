"""The typed scan report (round trip through the shipped schema) and its page, rendered by headless Chromium.

One real scan of a random-weight tiny CLIP (5 classes, |D| = |T| = 8; the same
settings as tests/test_reference.py, so the reference comes from the session's
cache in a full run) and one of a model with a NaN in a stored tensor
(unscannable) feed every test here; the backdoored case is a scan result with a
flagged class, written by the same ``write_scan``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import attrs
import jsonschema
import pytest
import torch
from click.testing import CliRunner

from ci_core.cli.scan import EXIT_CLEAN, EXIT_UNSCANNABLE
from ci_core.cli.scan import main as ci_scan
from ci_core.data.ood import load_pool
from ci_core.errors import DataError
from ci_core.harness.cells import stored_evidence
from ci_core.harness.report.html import write_bench_page
from ci_core.interfaces import ClassEvidence, Scores
from ci_core.models.backbone import TINY_IMAGE_SIZE
from ci_core.models.bundle import save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.pages import visible_text
from ci_core.pages import format_number
from ci_core.pages.scan_page import write_scan_page
from ci_core.scanning.inversion import PoolHealth
from ci_core.scanning.scan import ScanResult, ScorerVerdict
from ci_core.scanning.scan_report import (SCHEMA_PATH, SCHEMA_VERSION, BundleIdentity, ScanContext, ScanReport,
                                          read_scan_report, report_schema)
from ci_core.pages.scan_output import write_scan
from ci_core.scanning.scan_triggers import ScanTriggers
from ci_core.triggers import AdditiveTrigger

CLASSES = ("red circle", "blue square", "green star", "pink ring", "cyan cross")
SCAN_OPTIONS = ["--ood", "builtin", "--pool-size", "8", "--holdout", "8", "--option", "batch_size=4", "--quiet"]
HOSTILE = (
    "<script>document.title='pwned';document.body.setAttribute('data-pwned','1')</script>",
    "\"><img src=x onerror=\"document.title='pwned'\">",
    "javascript:document.title='pwned'",
    "\u202egnp.exe\u202c right-to-left",
    "w" * 300,
)
# CI installs Chromium (.ci/run) and sets this, so that there the browser test can never be skipped.
REQUIRE_BROWSER = "CI_REQUIRE_BROWSER"


@pytest.fixture(scope="module")
def scans(tmp_path_factory, random_backbone):
    """A clean real scan and an unscannable one (a NaN in the meta-net), through ci-scan."""
    root = tmp_path_factory.mktemp("scan-report")
    torch.manual_seed(0)
    fine = save_bundle(PromptTunedCLIP(random_backbone).eval(), CLASSES, root / "fine", base_classes=CLASSES[:3])
    broken_model = PromptTunedCLIP(random_backbone).eval()
    with torch.no_grad():
        broken_model.prompt_learner.meta_net.linear2.bias[0] = float("nan")
    broken = save_bundle(broken_model, CLASSES, root / "broken")
    outputs = {}
    for name, bundle, code in (("clean", fine, EXIT_CLEAN), ("unscannable", broken, EXIT_UNSCANNABLE)):
        result = CliRunner().invoke(ci_scan, [str(bundle), *SCAN_OPTIONS, "--out", str(root / name)])
        assert result.exit_code == code, result.output
        outputs[name] = (root / name, result.output)
    return outputs


def backdoored_result() -> ScanResult:
    """A scan result whose deciding scorer flags class 2 (the inversion itself is not what is tested here)."""
    evidence = tuple(ClassEvidence(name=n, asr=0.9 if i == 2 else 0.1, loss=-0.5 if i == 2 else 0.1 * i,
                                   statistic=None, ssim=0.95, seconds=0.1, loss_trace=(0.3, 0.2), seen=i < 3,
                                   trigger=AdditiveTrigger(torch.full((3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), 0.01 * i)))
                     for i, n in enumerate(CLASSES))
    scores = (0.1, -0.4, 6.0, 0.2, -0.3)
    decision = ScorerVerdict(scorer="ref-outlier", config={"alpha": 0.01}, scores=Scores(
        scores=scores, s_max=6.0, target=CLASSES[2], backdoored=True, flagged=(CLASSES[2],), p_value=0.002,
        rule="p <= 0.01 (Bonferroni over 5 classes)", per_class={"p": (1.0, 1.0, 0.002, 1.0, 1.0)}))
    beside = ScorerVerdict(scorer="ci", config={"k": 2.0}, scores=Scores(
        scores=(0.0, -1.0, 2.5, 0.3, -0.8), s_max=2.5, target=CLASSES[2], backdoored=True, flagged=(CLASSES[2],),
        rule="s_max >= 2"))
    return ScanResult(detector="ci", detector_config={"epsilon": 0.03}, classes=evidence,
                      health=PoolHealth(images=16, non_finite=0, spread=0.1), problems=(), decision=decision,
                      others=(beside,), seconds=1.0)


# --------------------------------------------------------------------------- the typed report


def test_reports_round_trip_through_the_shipped_schema(scans, tmp_path):
    pool = load_pool("builtin", inversion=4, holdout=4, image_size=TINY_IMAGE_SIZE, seed=0)
    context = ScanContext(bundle=BundleIdentity(path="delivered/bundle", sha256="ab" * 32), backbone=None, seed=3,
                          preset="tiny", device="cpu", command="ci-scan delivered/bundle --ood builtin")
    write_scan(backdoored_result(), tmp_path / "backdoored", pool, context)
    folders = {"clean": scans["clean"][0], "unscannable": scans["unscannable"][0], "backdoored": tmp_path / "backdoored"}
    assert SCHEMA_PATH.is_file() and report_schema()["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    for verdict, folder in folders.items():
        data = json.loads((folder / "report.json").read_text())
        jsonschema.validate(data, report_schema())  # what a pipeline would do with the shipped schema
        report = read_scan_report(folder)
        assert report.verdict == data["verdict"] == verdict and report.schema_version == SCHEMA_VERSION
        assert report.to_json() == data  # nothing lost or added between the file and the type
        assert (folder / "report.html").is_file()
    clean = read_scan_report(folders["clean"])
    assert clean.classnames == CLASSES and clean.decision.scorer == "ref-outlier"
    assert set(clean.decision.per_class) == {"score", "p", "p_class"} and [s.scorer for s in clean.scorers] == ["ref-outlier", "ci"]
    assert clean.backbone.name == "ci-tiny-clip" and clean.command.startswith("ci-scan ")
    assert clean.pool.inversion == 8 and clean.seed == 0 and len(clean.bundle.sha256) == 64
    assert all(row.reference is not None for row in clean.classes)
    # ci-scan marks the classes the bundle was tuned on (its base classes); the reader keeps the flags.
    assert [e.seen for e in clean.evidence()] == [True, True, True, False, False]
    assert [row["seen"] for row in json.loads((folders["clean"] / "report.json").read_text())["classes"]] == \
        [True, True, True, False, False]
    broken = read_scan_report(folders["unscannable"])
    assert broken.decision is None and broken.scorers == () and broken.classes == ()
    assert "NaN" in broken.unscannable_reasons[0] or "non-finite" in " ".join(broken.unscannable_reasons)
    flagged = read_scan_report(folders["backdoored"])
    assert flagged.decision.target == CLASSES[2] and flagged.command == context.command
    # Every reader goes through the type: repairs, the benchmark's rescoring.
    triggers = ScanTriggers.read(folders["backdoored"])
    assert triggers.target == CLASSES[2] and triggers.bundle_sha256 == "ab" * 32
    assert torch.allclose(triggers.pick("top").trigger.delta, torch.full((3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), 0.02))
    assert [e.name for e in stored_evidence(folders["clean"] / "report.json")] == list(CLASSES)


def test_old_reports_are_read_and_unknown_versions_or_edits_refused(scans, tmp_path):
    data = json.loads((scans["clean"][0] / "report.json").read_text())
    # Layout 1 (toolkit 0.3): no schema_version, format, context or per-class figures.
    old = {k: v for k, v in data.items() if k not in ("format", "schema_version", "toolkit_version", "command",
                                                      "created", "reference_pool_health", "backbone")}
    old["scorers"] = {name: {k: v for k, v in s.items() if k not in ("verdict", "per_class")}
                      for name, s in data["scorers"].items()}
    old["classes"] = [{k: v for k, v in row.items() if k != "trigger_file"} for row in data["classes"]]
    report = ScanReport.from_json(old, "old.json")
    assert report.schema_version == 1 and report.verdict == data["verdict"] and report.command is None
    assert report.decision.scores == tuple(row["score"] for row in data["classes"])
    assert report.classes[0].trigger_file == data["classes"][0]["trigger_file"]

    def refused(changed: dict, pattern: str) -> None:
        path = tmp_path / "report.json"
        path.write_text(json.dumps(changed))
        with pytest.raises(DataError, match=pattern):
            read_scan_report(path)

    refused({**data, "schema_version": 7}, r"schema_version 7 is not one this toolkit .* reads \(it reads 1 and 2\)")
    refused({**data, "verdict": "backdoored" if data["verdict"] == "clean" else "clean"}, "disagrees")
    refused({**data, "p_value": 0.5 if data["p_value"] != 0.5 else 0.4}, "'p_value' is")
    refused({**data, "classes": [{**data["classes"][0], "trigger_file": "../../etc/passwd"}] + data["classes"][1:]},
            "trigger_file")
    refused({**data, "classes": [{**data["classes"][0], "asr": "high"}] + data["classes"][1:]}, r"classes\[0\]\.asr")


# --------------------------------------------------------------------------- the page, in a browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = ("no headless Chromium to render report.html: install Debian's chromium (apt-get install chromium; "
               ".ci/run does so)")
    if os.environ.get(REQUIRE_BROWSER):
        pytest.fail(message + f"; ${REQUIRE_BROWSER} is set, so this test may not be skipped")
    pytest.skip(message)


def browse(page: Path, *extra: str) -> str:
    """Run headless Chromium on ``page`` (a fresh profile, no network); its stdout (the DOM for --dump-dom)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *extra, page.absolute().as_uri()],
            capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class DOM(HTMLParser):
    """The rendered DOM as Chromium serialised it: every element with its attributes, titles, and table cells."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self._table = self._cell = None
        self._title = False
        self.title = ""
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if tag == "table":
            self._table = attributes.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "title":
            self._title = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "title":
            self._title = False

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._title:
            self.title += data


def hostile_copy(folder: Path, target: Path) -> ScanReport:
    """The real scan's report with the provider's strings (class names, bundle path, template) made hostile."""
    shutil.copytree(folder, target)
    report = read_scan_report(folder)
    rename = dict(zip(report.classnames, HOSTILE))
    hostile = attrs.evolve(
        report, bundle=attrs.evolve(report.bundle, path=HOSTILE[1]),
        reference=attrs.evolve(report.reference, template=HOSTILE[0] + " {}"),
        classes=tuple(attrs.evolve(row, evidence=attrs.evolve(row.evidence, name=rename[row.name]))
                      for row in report.classes),
        scorers=tuple(attrs.evolve(s, target=rename[s.target], flagged=tuple(rename[f] for f in s.flagged))
                      for s in report.scorers))
    # The hostile report is a valid report: it round-trips, schema included.
    assert ScanReport.from_json(json.loads(json.dumps(hostile.to_json())), "hostile") == hostile
    write_scan_page(hostile, target)
    return hostile


def test_report_page_in_headless_chromium(scans, tmp_path):
    folder, output = scans["clean"]
    page = folder / "report.html"
    assert str(page) in output  # ci-scan prints the page's path with the verdict
    report = read_scan_report(folder)
    dom = DOM(browse(page, "--dump-dom"))
    text = " ".join(" ".join(dom.text).split())
    decided = report.decision
    assert text.count(report.verdict) >= 1 and dom.title.startswith(report.verdict.upper())
    assert f"{decided.p_value:.3f}" in text and decided.target in text and decided.rule in text
    rows = dom.tables["classes"]
    assert [row[1] for row in rows[1:]] == [report.classnames[i] for i in report.ranking()]
    assert all(len(row) == len(rows[0]) for row in rows)
    tuned_on = rows[0].index("tuned on")  # the bundle's base classes, which the verdict gives their own intercept
    assert {row[1]: row[tuned_on] for row in rows[1:]} == {n: "yes" if n in CLASSES[:3] else "no" for n in CLASSES}
    # Each trigger read by the backbone too: the transfer figure, and both margins per class in the table.
    assert any(tag == "figure" and a.get("id") == "transfer" for tag, a in dom.elements)
    read_by_backbone = rows[0].index("backbone's margin, same trigger")
    by_name = {e.name: e for e in report.evidence()}
    assert {row[1]: row[read_by_backbone] for row in rows[1:]} == {
        n: format_number(by_name[n].transfer_margin) for n in CLASSES}
    images = [a for tag, a in dom.elements if tag == "img"]
    assert images and all(a["src"].startswith("data:image/png;base64,") for a in images)  # self-contained
    assert not any(tag == "script" for tag, _ in dom.elements)
    shot = tmp_path / "page.png"
    browse(page, f"--screenshot={shot}", "--window-size=1200,2400")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The provider's strings are inert text: no script runs, no element appears, the table keeps its shape.
    hostile_folder = tmp_path / "hostile"
    hostile = hostile_copy(folder, hostile_folder)
    dom = DOM(browse(hostile_folder / "report.html", "--dump-dom"))
    # the payloads would have replaced the title; the direction override is shown, not obeyed
    assert dom.title == f"{hostile.verdict.upper()}: scan of {HOSTILE[1]}"
    assert visible_text(HOSTILE[3]) == "<U+202E>gnp.exe<U+202C> right-to-left"
    assert not any(tag == "script" or "onerror" in a or "data-pwned" in a for tag, a in dom.elements)
    assert [a["src"][:22] for tag, a in dom.elements if tag == "img"] == [a["src"][:22] for a in images]
    rows = dom.tables["classes"]
    assert sorted(row[1] for row in rows[1:]) == sorted(map(visible_text, HOSTILE))  # whole, as text, in its cell
    assert all(len(row) == len(rows[0]) for row in rows)
    assert not any(tag == "a" for tag, _ in dom.elements)  # no name became a link
    browse(hostile_folder / "report.html", f"--screenshot={shot}", "--window-size=1200,2400")

    # A report written before the backbone's reading was recorded: no transfer figure, no such column.
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    write_scan_page(attrs.evolve(report, classes=tuple(
        attrs.evolve(row, evidence=attrs.evolve(row.evidence, transfer_margin=None)) for row in report.classes)), older)
    html = (older / "report.html").read_text()
    assert 'id="transfer"' not in html and "same trigger" not in html and 'id="classes"' in html

    # Unscannable: the reasons, and no table or figure that could be read as a result.
    broken = read_scan_report(scans["unscannable"][0])
    dom = DOM(browse(scans["unscannable"][0] / "report.html", "--dump-dom"))
    text = " ".join(" ".join(dom.text).split())
    assert dom.title.startswith("UNSCANNABLE") and broken.unscannable_reasons[0] in text
    assert "classes" not in dom.tables and not any(tag == "img" for tag, _ in dom.elements)


def test_scan_help_says_where_the_page_is():
    result = CliRunner().invoke(ci_scan, ["--help"])
    assert result.exit_code == 0 and "OUT/report.html" in result.output and "scan-report.schema.json" in result.output


def test_bench_page_shows_every_table_and_column_the_report_holds(tmp_path):
    """Generic over build_report's JSON: a column or table added there appears without an edit to the page."""
    group = {"label": "ci / ref-outlier", "detector": "ci", "scorer": "ref-outlier", "variant": {"pool_size": 8, "inversion_data": "ood"},
             "detector_config": {"epsilon": 0.03}, "scorer_config": {"alpha": 0.01}, "pool": {"source": "builtin"},
             "verdict": {"fpr": 0.0, "fpr_ci95": [0.0, 0.3], "tpr": 1.0, "tpr_works": 0.75, "rule": HOSTILE[0]},
             "model_level": {"auroc": 0.9, "roc": {"fpr": [0, 1], "tpr": [0, 1], "thresholds": [1, 0]},
                             "implanted": [{"min_asr_unseen": 0.5, "auroc": 1.0}]},
             "class_level": {"attack": [{"name": "badclip", "tp": 3}]},
             "per_model": [{"model": HOSTILE[1], "s_max": {"mean": 4.0, "std": None, "n": 1}}]}
    report = {"store": "store", "definitions": {"verdict": "What an auditor gets."}, "counts": {"models": 2},
              "detectors": [group], "attacks": [{"attack": "badclip", "acc_seen": 0.9}], "failures": [],
              "new_table": [{"cell": "x", "seconds": 1.5}]}
    page = write_bench_page(report, tmp_path, ())
    html = page.read_text()
    for shown in ("tpr works", "0.750", "FPR 95% CI", "0.000–0.300", "Per model", "4.000", "New table", "1.500",
                  "What an auditor gets.", "Model-level detection over backdoors that implanted", "per attack"):
        assert shown in html, shown
    assert "<script" not in html and "<img src=x" not in html and "&lt;script&gt;" in html
    assert "thresholds" not in html  # a curve is a figure, not a cell
