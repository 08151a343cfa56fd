"""OpenAI's TorchScript CLIP archives as backbone files: read only when their SHA-256 is the published one."""

import pickle
import shutil
import zipfile

import pytest

from ci_core.errors import ConfigError
from ci_core.models import weights
from ci_core.files import file_sha256
from ci_core.models.backbone import load_backbone
from ci_core.models.weights import OPENAI_ARCHIVES, OpenAIArchive

from delivery_layout import CreatesFile, torchscript_archive


@pytest.fixture(scope="module")
def traced(tmp_path_factory, random_backbone):
    """The tiny architecture's random CLIP as a TorchScript archive (traced once; tests take copies)."""
    return torchscript_archive(random_backbone, tmp_path_factory.mktemp("traced") / "tiny.pt")


def test_the_published_hashes_name_their_open_clip_architectures():
    by_name = {a.openai_name: (sha, a) for sha, a in OPENAI_ARCHIVES.items()}
    sha, vit_b_16 = by_name["ViT-B/16"]
    assert sha == "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
    assert vit_b_16.architecture == "ViT-B-16" and vit_b_16.quick_gelu
    assert len(OPENAI_ARCHIVES) == 9 and all(len(h) == 64 and int(h, 16) >= 0 for h in OPENAI_ARCHIVES)


def test_an_unpublished_torchscript_archive_is_refused_saying_why(traced):
    path = traced
    sha = file_sha256(path)
    with pytest.raises(ConfigError, match=rf"{path}: a TorchScript archive \(it holds code\), with SHA-256 {sha}, "
                                          r"which is not one of OpenAI's published CLIP archives \(.*ViT-B/16 5806e77cd80f"):
        load_backbone("ViT-B-16", str(path))


def _plant(path, member_suffix: str, payload: bytes):
    """Rewrite the archive with ``payload`` as its member ending in ``member_suffix``."""
    with zipfile.ZipFile(path) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as target:
        for info, data in members:
            target.writestr(info, payload if info.filename.endswith(member_suffix) else data)


def test_a_published_archive_gives_its_weights_and_nothing_in_it_runs(tmp_path, traced, random_backbone, monkeypatch):
    path = shutil.copy(traced, tmp_path / "tiny.pt")
    marker = tmp_path / "constants-ran"
    _plant(path, "/constants.pkl", pickle.dumps(CreatesFile(marker), protocol=2))  # would create a file if loaded
    # Only the test can publish a hash: pretend this archive is OpenAI's, for the tiny architecture.
    monkeypatch.setitem(OPENAI_ARCHIVES, file_sha256(path), OpenAIArchive("tiny", random_backbone.name, quick_gelu=False))
    loaded = load_backbone(random_backbone.name, str(path))
    assert loaded.weights_sha256 == random_backbone.weights_sha256 and not loaded.quick_gelu
    assert not marker.exists()
    with pytest.raises(ConfigError, match=rf"{path} is OpenAI's tiny archive, which is open_clip's ci-tiny-clip, "
                                          r"not ViT-B-16; pass --backbone ci-tiny-clip"):
        load_backbone("ViT-B-16", str(path))


def test_an_openai_archive_implies_quick_gelu(tmp_path, traced, random_backbone, monkeypatch):
    path = traced
    monkeypatch.setitem(OPENAI_ARCHIVES, file_sha256(path), OpenAIArchive("tiny", random_backbone.name))
    assert load_backbone(random_backbone.name, str(path)).quick_gelu
    assert weights.is_torchscript(path) and not weights.is_torchscript(tmp_path)
