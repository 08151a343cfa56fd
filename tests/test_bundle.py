import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ci_core.errors import BundleError, ConfigError
from ci_core.models.backbone import load_backbone
from ci_core.models.bundle import bundle_sha256, load_bundle, save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.backbone import TINY_IMAGE_SIZE

CLASSES = ("red circle", "blue square", "green star")


@pytest.fixture()
def model(random_backbone):
    torch.manual_seed(3)
    m = PromptTunedCLIP(random_backbone)
    with torch.no_grad():  # make the meta-net matter
        for p in m.prompt_learner.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return m


@pytest.fixture()
def bundle(tmp_path, model):
    return save_bundle(model, CLASSES, tmp_path / "bundle", base_classes=CLASSES[:2])


def test_round_trip_gives_identical_logits(model, bundle, random_backbone):
    images = torch.rand(5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    loaded, meta = load_bundle(bundle, backbone=random_backbone)
    assert meta["classnames"] == list(CLASSES)
    assert torch.equal(model(images, CLASSES), loaded(images, CLASSES))


def test_round_trip_rebuilds_backbone_from_metadata(model, bundle):
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    loaded, _ = load_bundle(bundle)  # backbone "random:0" is rebuilt from the recorded identity
    assert torch.equal(model(images, CLASSES), loaded(images, CLASSES))


def test_bundle_holds_only_json_and_safetensors(bundle):
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "weights.safetensors"]
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["backbone"]["name"] == "ci-tiny-clip" and len(meta["backbone"]["weights_sha256"]) == 64
    assert meta["backbone"]["pretrained"] == "random:0" and meta["backbone"]["quick_gelu"] is False
    assert meta["tensors"]["prompt_learner.ctx"] == [4, 64]


def test_refuses_to_overwrite(model, bundle):
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(model, CLASSES, bundle)


def test_mis_shaped_tensor_names_key_and_both_shapes(bundle):
    tensors = load_file(str(bundle / "weights.safetensors"))
    tensors["prompt_learner.meta_net.linear1.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(bundle / "weights.safetensors"))
    with pytest.raises(BundleError, match=r"'prompt_learner.meta_net.linear1.weight' has shape \[3, 3\], expected \[8, 128\]"):
        load_bundle(bundle)


def test_missing_tensor_is_named(bundle):
    tensors = load_file(str(bundle / "weights.safetensors"))
    del tensors["prompt_learner.ctx"]
    save_file(tensors, str(bundle / "weights.safetensors"))
    with pytest.raises(BundleError, match=r"missing tensor 'prompt_learner.ctx' \(expected shape \[4, 64\]\)"):
        load_bundle(bundle)


def test_pickle_file_is_not_loaded(bundle):
    (bundle / "weights.safetensors").write_bytes(b"\x80\x04\x95 not a safetensors file")
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bundle(bundle)


def test_other_backbone_weights_are_refused_showing_both(bundle, random_backbone):
    other = load_backbone("ci-tiny-clip", "random:1")
    for kwargs in ({"backbone": other}, {"pretrained": "random:1"}):
        with pytest.raises(BundleError) as caught:
            load_bundle(bundle, **kwargs)
        message = str(caught.value)
        trained, given = random_backbone.weights_sha256, other.weights_sha256
        assert f"trained on backbone ci-tiny-clip (random:0, GELU) with weights sha256 {trained}" in message
        assert f"the backbone given is ci-tiny-clip (random:1, GELU) with weights sha256 {given}" in message


def test_same_weights_from_a_local_file_are_accepted(tmp_path, model, bundle, random_backbone):
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in random_backbone.model.state_dict().items()}, str(weights))
    loaded, _ = load_bundle(bundle, pretrained=str(weights))
    assert loaded.backbone.pretrained == str(weights.resolve())
    images = torch.rand(2, 3, random_backbone.image_size, random_backbone.image_size)
    assert torch.equal(model(images, CLASSES), loaded(images, CLASSES))


def test_same_weights_with_another_activation_are_refused(bundle):
    quick = load_backbone("ci-tiny-clip", "random:0", quick_gelu=True)  # same tensors, QuickGELU
    with pytest.raises(BundleError, match=r"\(random:0, GELU\) .* given is ci-tiny-clip \(random:0, QuickGELU\)"):
        load_bundle(bundle, backbone=quick)


def test_a_weights_file_the_bundle_names_is_never_opened_and_the_way_out_is_said(tmp_path, bundle, random_backbone):
    weights = tmp_path / "backbone.safetensors"  # the very weights, so that only the refusal can fail the load
    save_file({k: v.contiguous() for k, v in random_backbone.model.state_dict().items()}, str(weights))
    meta_path = bundle / "bundle.json"
    meta = json.loads(meta_path.read_text())
    for source in (str(weights), "/elsewhere/backbone.safetensors", "https://example.invalid/w.safetensors",
                   "hf-hub:someone/tiny-clip"):
        meta["backbone"]["pretrained"] = source
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(ConfigError, match=r"cannot load the bundle's backbone ci-tiny-clip \(.*\): .*never read "
                                              r"from a file, URL or hub repository .* pass it with --pretrained FILE"):
            load_bundle(bundle)
    loaded, _ = load_bundle(bundle, pretrained=str(weights))  # given by the auditor, the same file is fine
    assert loaded.backbone.weights_sha256 == random_backbone.weights_sha256


def test_metadata_errors(bundle):
    meta_path = bundle / "bundle.json"
    meta = json.loads(meta_path.read_text())
    del meta["classnames"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"missing keys \['classnames'\]"):
        load_bundle(bundle)
    meta_path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle)


def test_bundle_hash_changes_with_weights(tmp_path, model, bundle):
    with torch.no_grad():
        model.prompt_learner.ctx.add_(1.0)
    other = save_bundle(model, CLASSES, tmp_path / "other")
    assert bundle_sha256(bundle) != bundle_sha256(other)
