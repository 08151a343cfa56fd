"""Backbones: open_clip names, pretrained tags (cached or not), local weights files, random weights."""

import pickle

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ci_core.errors import ConfigError
from ci_core.models import weights as weights_module
from ci_core.models.backbone import TINY_MODEL, load_backbone
from ci_core.models.weights import state_dict_sha256

TAG = "ci_test_tag"


def weights_of(backbone) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in backbone.model.state_dict().items()}


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to reach a download host fails the test: loading must not need one."""
    def refuse(url, timeout=None):
        raise AssertionError(f"tried to reach {url}")

    monkeypatch.setattr(weights_module, "reachable", refuse)


@pytest.fixture()
def fake_tag(monkeypatch):
    """Register pretrained tag TAG for the tiny CLIP, as open_clip does for its models; returns its config."""
    cfg = {}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_MODEL, {TAG: cfg})
    return cfg


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ConfigError, match=r"unknown open_clip model 'ViT-B-61'\. Close matches: .*ViT-B-16"):
        load_backbone("ViT-B-61", "random:0")


def test_unknown_pretrained_lists_the_model_tags():
    with pytest.raises(ConfigError, match=r"pretrained 'opnai' for ViT-B-16: .*openai.*\(close: openai\)"):
        load_backbone("ViT-B-16", "opnai")


def test_builtin_weights_only_for_the_tiny_clip():
    with pytest.raises(ConfigError, match="'builtin' exists only for 'ci-tiny-clip'"):
        load_backbone("ViT-B-16", "builtin")


def test_uncached_tag_without_network_fails_fast_and_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(weights_module, "reachable", lambda url, timeout=None: False)

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted although the host is unreachable")

    # Failing fast means never starting open_clip's (slow, retrying) download.
    for name in ("download_pretrained", "download_pretrained_from_hf", "download_pretrained_from_url"):
        monkeypatch.setattr(open_clip.pretrained, name, no_download)
    with pytest.raises(ConfigError) as caught:
        load_backbone("ViT-B-16", "openai", cache_dir=str(tmp_path))
    message = str(caught.value)
    assert "not in the open_clip cache" in message and "unreachable" in message
    assert "huggingface.co/timm/vit_base_patch16_clip_224.openai" in message
    # OpenAI's weights use QuickGELU, which a weights file does not record: the hint names the right model
    assert "--backbone ViT-B-16-quickgelu --pretrained /path/to/weights.safetensors" in message


def test_uncached_tag_with_hub_offline_says_so(monkeypatch, tmp_path, no_network):
    monkeypatch.setattr(weights_module, "_hub_offline", lambda: True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set.*--pretrained /path/to/weights.safetensors"):
        load_backbone("ViT-B-16", "laion2b_s34b_b88k", cache_dir=str(tmp_path))


def test_tag_in_the_hub_cache_loads_without_network(tmp_path, fake_tag, no_network):
    source = load_backbone(TINY_MODEL, "random:5")
    fake_tag.update(hf_hub="ci-test/tiny-clip/", quick_gelu=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    # huggingface_hub's cache layout: refs/main names the snapshot holding the files
    repo = tmp_path / "models--ci-test--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    save_file(weights_of(source), str(snapshot / "open_clip_model.safetensors"))
    loaded = load_backbone(TINY_MODEL, TAG, cache_dir=str(tmp_path))
    assert loaded.weights_sha256 == source.weights_sha256
    assert loaded.pretrained == TAG and loaded.quick_gelu  # the tag's activation
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)  # and its image statistics


def test_tag_in_the_url_cache_loads_without_network(tmp_path, fake_tag, no_network):
    source = load_backbone(TINY_MODEL, "random:6")
    fake_tag.update(url="https://example.invalid/weights/tiny.safetensors")
    save_file(weights_of(source), str(tmp_path / "tiny.safetensors"))
    loaded = load_backbone(TINY_MODEL, TAG, cache_dir=str(tmp_path))
    assert loaded.weights_sha256 == source.weights_sha256 and not loaded.quick_gelu


def test_local_safetensors_and_torch_files_give_the_same_backbone(tmp_path):
    source = load_backbone(TINY_MODEL, "random:7")
    save_file(weights_of(source), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights_of(source).items()}}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_backbone(TINY_MODEL, str(tmp_path / name))
        assert loaded.weights_sha256 == source.weights_sha256
        assert loaded.pretrained == str((tmp_path / name).resolve())
    assert state_dict_sha256(weights_of(source)) == source.weights_sha256


class Payload:
    """Unpickling this would run code: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_in_a_torch_file_are_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"weight": Payload()}, handle, protocol=2)
    with pytest.raises(ConfigError, match=r"evil\.pt: not readable as plain tensors"):
        load_backbone(TINY_MODEL, str(tmp_path / "evil.pt"))


def test_weights_of_another_architecture_are_named(tmp_path):
    weights = weights_of(load_backbone(TINY_MODEL, "random:0"))
    weights["bogus.weight"] = torch.zeros(2)
    weights["text_projection"] = torch.zeros(3, 3)
    del weights["ln_final.bias"]
    save_file(weights, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"does not fit ci-tiny-clip: 1 missing tensors \['ln_final.bias'\], "
                                          r"1 unexpected \['bogus.weight'\], "
                                          r"1 of another shape \['text_projection \[3, 3\] \(expected"):
        load_backbone(TINY_MODEL, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_backbone(TINY_MODEL, str(tmp_path / "missing.safetensors"))


def test_random_weights_follow_the_seed_and_quick_gelu_is_recorded():
    a, b, c = (load_backbone(TINY_MODEL, s) for s in ("random:0", "random:0", "random:1"))
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    quick = load_backbone(TINY_MODEL, "random:0", quick_gelu=True)
    assert quick.weights_sha256 == a.weights_sha256  # the activation has no weights ...
    assert quick.identity()["quick_gelu"] and not a.identity()["quick_gelu"]  # ... so the identity records it
    with pytest.raises(ConfigError, match="random:SEED with an integer seed"):
        load_backbone(TINY_MODEL, "random:x")
