import json
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner

from ci_core.models.backbone import load_backbone


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _reference_cache(tmp_path_factory):
    """Reference scans are cached in a folder of the session, never in the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CI_CACHE_DIR", str(tmp_path_factory.mktemp("ci-cache")))
        yield


@pytest.fixture(scope="session")
def random_backbone():
    """The tiny CLIP architecture with random weights: fast, for mechanics that need no trained model."""
    return load_backbone("ci-tiny-clip", "random:0")


@pytest.fixture(scope="session")
def tiny_backbone():
    """The shipped, trained tiny CLIP."""
    return load_backbone()


@attrs.frozen(eq=False)
class DemoRun:
    out: Path  # models/<name>/bundle and models/<name>/trigger.safetensors, scans/<name> CI reports
    rows: dict  # the demo's JSON rows by model name
    output: str


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """``ci-bench demo`` once per session: a clean and a BadCLIP model on tiny-colorshapes (seed 1), each scanned
    by CI; the end-to-end tests check it and the repair tests remove its backdoor."""
    from ci_core.cli.bench import main as ci_bench

    out = tmp_path_factory.mktemp("demo") / "out"
    rows_path = out.parent / "rows.json"
    result = CliRunner().invoke(ci_bench, ["demo", "--out", str(out), "--json", str(rows_path),
                                           "--attacks", "clean,badclip", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = {row["model"]: row for row in json.loads(rows_path.read_text())}
    return DemoRun(out=out, rows=rows, output=result.output)
