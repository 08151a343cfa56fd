"""ci-import and ci_core.models.delivery on checkpoints written in the exact layout of the reference CoOp/CoCoOp
code."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from ci_core.cli.import_checkpoint import main as ci_import
from ci_core.models.delivery import (import_checkpoint, import_trigger, is_checkpoint_delivery, open_model,
                                     read_checkpoint, resolve_checkpoint)
from ci_core.errors import BundleError, ConfigError, DataError
from ci_core.files import file_sha256
from ci_core.models.backbone import TINY_IMAGE_SIZE, load_backbone
from ci_core.models.bundle import load_bundle, save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.coop import CoOpCLIP, reference_logits
from ci_core.triggers import AdditiveTrigger
from ci_core.plugins import load_trigger

from delivery_layout import (CreatesFile, RunsCode, badclip_trigger, cocoop_state, coop_state, prompt_embeddings,
                             save_dassl)

CLASSES = ("red circle", "green square", "blue triangle", "yellow ring")  # the tiny world's: in the tiny token table
BASE = CLASSES[:2]
TINY = ["--backbone", "ci-tiny-clip"]


def perturbed(model):
    """Move every learned tensor far from its initialisation, so that each of them shows in the logits."""
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.fixture()
def cocoop(tiny_backbone):
    torch.manual_seed(1)
    return perturbed(PromptTunedCLIP(tiny_backbone, ctx_init=None))


def classes_file(tmp_path, names=CLASSES, name="classes.txt"):
    path = tmp_path / name
    path.write_text("# the deployment's classes, base first\n" + "\n".join(names) + "\n")
    return path


def run_import(*args):
    result = CliRunner().invoke(ci_import, [str(a) for a in args])
    return result


def assert_clean_failure(result, out):
    """Exit status 1, a message and no traceback, nothing written."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert not out.exists()


def native_model(model, classnames, tmp_path, state):
    """The weights of a checkpoint's ``state`` (upcast, as fp32) loaded as a native bundle."""
    model = PromptTunedCLIP(model.backbone, n_ctx=model.n_ctx, ctx_init=None)
    model.prompt_learner.load_state_dict({k: v.float() for k, v in state.items() if not k.startswith("token_")})
    loaded, _ = load_bundle(save_bundle(model.eval(), classnames, tmp_path / "native"), backbone=model.backbone)
    return loaded


def logits_of_features(model, features, classnames):
    """A CoCoOp model's logits (its forward after the image encoder) for image features computed once."""
    with torch.no_grad():
        text = model.encode_prompts(model.prompt_learner(features), model.class_prompts(classnames))
        return model.clip.logit_scale.exp() * torch.einsum("bd,bkd->bk", features, text)


# --------------------------------------------------------------------------- CoCoOp, tiny CLIP, through the CLI


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_ci_import_turns_a_cocoop_delivery_into_a_bundle_with_the_same_logits(tmp_path, cocoop, dtype):
    state = cocoop_state(cocoop, BASE, dtype)
    path = save_dassl(tmp_path / "OUTPUT", "prompt_learner", state, learner=cocoop.prompt_learner)
    out = tmp_path / "bundle"
    result = run_import(tmp_path / "OUTPUT", "--classes", classes_file(tmp_path), "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    assert "    1  red circle\n    2  green square\n" in result.output  # the names recovered from token_suffix
    assert f"a CoCoOp prompt learner, n_ctx 4, {str(dtype).removeprefix('torch.')}" in result.output
    assert "skipped entries: optimizer, scheduler, val_result" in result.output
    assert "torch.optim.sgd.SGD" in result.output and "torch.optim.lr_scheduler.CosineAnnealingLR" in result.output

    loaded, meta = load_bundle(out)
    assert meta["kind"] == "cocoop" and meta["classnames"] == list(CLASSES) and meta["base_classes"] == list(BASE)
    assert meta["backbone"]["name"] == "ci-tiny-clip" and meta["n_ctx"] == 4
    assert meta["source"]["sha256"] == file_sha256(path) and meta["source"]["epoch"] == 10
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        imported = loaded(images, CLASSES)
        native = native_model(cocoop, CLASSES, tmp_path, state)(images, CLASSES)
    torch.testing.assert_close(imported, native, atol=1e-5, rtol=0)
    if dtype == torch.float32:
        with torch.no_grad():
            torch.testing.assert_close(imported, cocoop(images, CLASSES), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- CoCoOp, ViT-B/16 with context length 77


@pytest.fixture(scope="module")
def vit():
    """ViT-B/16 with OpenAI's QuickGELU and random weights: the real shapes and the real 77-token context."""
    return load_backbone("ViT-B-16-quickgelu", "random:0")


@pytest.fixture(scope="module")
def vit_features(vit):
    """The frozen image encoder's features of one image, computed once (every model here shares the encoder)."""
    with torch.no_grad():
        return PromptTunedCLIP(vit).image_features(torch.rand(1, 3, 224, 224))


VIT_CLASSES = ("golden retriever", "fire truck", "sunflower", "hot-air balloon")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_vit_b_16_checkpoint_names_and_logits(tmp_path, vit, vit_features, dtype):
    assert vit.model.positional_embedding.shape[0] == 77 and vit.quick_gelu
    torch.manual_seed(2)
    model = perturbed(PromptTunedCLIP(vit, ctx_init=None))
    state = cocoop_state(model, VIT_CLASSES[:3], dtype)
    assert state["token_suffix"].shape == (3, 72, 512) and state["meta_net.linear1.weight"].shape == (32, 512)
    path = save_dassl(tmp_path / "OUTPUT", "prompt_learner", state, learner=model.prompt_learner)
    imported = import_checkpoint(path, VIT_CLASSES, vit)
    assert imported.recovered == VIT_CLASSES[:3] and imported.kind == "cocoop"
    assert imported.base_classes == VIT_CLASSES[:3] and imported.precision == str(dtype).removeprefix("torch.")
    native = native_model(model, VIT_CLASSES, tmp_path, state)
    torch.testing.assert_close(logits_of_features(imported.model, vit_features, VIT_CLASSES),
                               logits_of_features(native, vit_features, VIT_CLASSES), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- what a checkpoint may hold


def test_real_scheduler_objects_are_skipped_and_payloads_never_run(tmp_path, cocoop):
    opened, executed = tmp_path / "opened", tmp_path / "executed"
    path = save_dassl(tmp_path / "OUTPUT", "prompt_learner", cocoop_state(cocoop, BASE), learner=cocoop.prompt_learner,
                      val_result=RunsCode(executed), extra={"payload": CreatesFile(opened)})
    torch.load(path, weights_only=False)  # the payloads are real: plain torch.load runs both
    assert opened.exists() and executed.exists()
    opened.unlink()
    executed.unlink()

    result = run_import(path, "--classes", classes_file(tmp_path), "--out", tmp_path / "bundle", *TINY)
    assert result.exit_code == 0, result.output
    assert not opened.exists() and not executed.exists()
    assert "skipped entries: optimizer, scheduler, val_result, payload" in result.output
    assert "builtins.exec" in result.output and "delivery_layout.ConstantWarmupScheduler" not in result.output
    checkpoint = read_checkpoint(path)
    assert {"torch.optim.sgd.SGD", "torch.optim.lr_scheduler.CosineAnnealingLR", "builtins.exec"} <= set(
        checkpoint.skipped_objects)


def test_a_payload_inside_the_state_dict_is_an_error_naming_the_entry(tmp_path, cocoop):
    opened = tmp_path / "opened"
    state = {**cocoop_state(cocoop, BASE), "meta_net.linear2.bias": CreatesFile(opened)}
    path = save_dassl(tmp_path / "OUTPUT", "prompt_learner", state)
    result = run_import(path, "--classes", classes_file(tmp_path), "--out", tmp_path / "bundle", *TINY)
    assert_clean_failure(result, tmp_path / "bundle")
    assert "state_dict entry 'meta_net.linear2.bias' is an object of io.open (never created), not a tensor" in result.output
    assert not opened.exists()


def test_token_suffix_of_other_classes_names_the_first_difference(tmp_path, cocoop):
    save_dassl(tmp_path / "OUTPUT", "prompt_learner", cocoop_state(cocoop, ("red circle", "purple cross")))
    classes = classes_file(tmp_path)
    result = run_import(tmp_path / "OUTPUT", "--classes", classes, "--out", tmp_path / "bundle", *TINY)
    assert_clean_failure(result, tmp_path / "bundle")
    assert (f"was trained on 2 classes ('red circle', 'purple cross'); class 2 of {classes} is 'green square', "
            "but the checkpoint holds 'purple cross' there") in result.output.replace("\n", " ")


def test_a_class_list_of_the_wrong_length(tmp_path, cocoop, tiny_backbone):
    path = save_dassl(tmp_path / "OUTPUT", "prompt_learner", cocoop_state(cocoop, CLASSES[:3]))
    short = classes_file(tmp_path, CLASSES[:2], "short.txt")
    result = run_import(path, "--classes", short, "--out", tmp_path / "bundle", *TINY)
    assert_clean_failure(result, tmp_path / "bundle")
    assert f"{short} has 2 classes, but {path} was trained on 3" in result.output.replace("\n", " ")
    # A class-specific CoOp context classifies exactly its training classes.
    ctx = torch.randn(3, 4, tiny_backbone.text_width)
    csc = save_dassl(tmp_path / "COOP", "prompt_learner", coop_state(ctx, tiny_backbone, CLASSES[:3]))
    with pytest.raises(DataError, match=r"has 4 classes, but .* class-specific CoOp context for exactly 3 classes"):
        import_checkpoint(csc, CLASSES, tiny_backbone)


def test_a_truncated_checkpoint_names_the_file(tmp_path, cocoop):
    path = save_dassl(tmp_path / "OUTPUT", "prompt_learner", cocoop_state(cocoop, BASE))
    path.write_bytes(path.read_bytes()[:-300])
    result = run_import(path, "--classes", classes_file(tmp_path), "--out", tmp_path / "bundle", *TINY)
    assert_clean_failure(result, tmp_path / "bundle")
    assert f"{path}: not a readable zip archive" in result.output and "truncated" in result.output


def test_malformed_checkpoints_say_what_was_expected(tmp_path, cocoop, tiny_backbone):
    state = cocoop_state(cocoop, BASE)
    cases = {
        "no-state": ({"model": state, "epoch": 1}, r"no 'state_dict' entry \(it has \['model', 'epoch'\]\)"),
        "layout": ({"state_dict": {"prompt": state["ctx"], "token_suffix": state["token_suffix"]}},
                   r"unknown learner layout: its state_dict has \['prompt', 'token_suffix'\]; expected CoCoOp's "),
        "ctx-width": ({"state_dict": {**state, "ctx": torch.zeros(4, 32)}},
                      r"tensor 'ctx' has shape \[4, 32\], but on backbone ci-tiny-clip \(builtin\) \(text width 64, "
                      r"image features 128, context length 16\) it must be \[n_ctx, 64\]"),
        "meta-net": ({"state_dict": {**state, "meta_net.linear1.weight": torch.zeros(16, 128)}},
                     r"tensor 'meta_net.linear1.weight' has shape \[16, 128\], but on backbone ci-tiny-clip "
                     r"\(builtin\) \(.*\) it must be \[8, 128\]"),
        "trigger": ({"state_dict": {"trigger": torch.zeros(1, 3, 96, 96)}}, r"this is a BadCLIP trigger checkpoint"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.pth.tar"
        torch.save(content, path)
        with pytest.raises(BundleError, match=rf"{path}: {message}"):
            import_checkpoint(path, CLASSES, tiny_backbone)
    with pytest.raises(BundleError, match=r"not a torch zip archive"):
        import_checkpoint(classes_file(tmp_path), CLASSES, tiny_backbone)


def test_a_checkpoint_of_another_backbone_is_named(tmp_path, random_backbone, tiny_backbone):
    torch.manual_seed(0)
    other = perturbed(PromptTunedCLIP(random_backbone, ctx_init=None))
    path = save_dassl(tmp_path / "OUTPUT", "prompt_learner", cocoop_state(other, BASE))
    with pytest.raises(BundleError, match=rf"{path}: token_prefix is not the start-of-text embedding of backbone "
                                          r"ci-tiny-clip \(builtin\): the checkpoint was trained on another backbone"):
        import_checkpoint(path, CLASSES, tiny_backbone)
    state = cocoop_state(other, BASE)
    state["token_prefix"] = prompt_embeddings(tiny_backbone, BASE, 4, torch.float32)[0]
    torch.save({"state_dict": state}, path)
    with pytest.raises(BundleError, match=r"token_suffix\[0, 0\] \(token 0 of training class 1's name\) is not a row "
                                          r"of the token-embedding table of backbone ci-tiny-clip \(builtin\)"):
        import_checkpoint(path, CLASSES, tiny_backbone)


# --------------------------------------------------------------------------- CoOp


@pytest.mark.parametrize("position,class_specific", [("end", False), ("middle", True), ("front", False)])
def test_coop_deliveries_import_with_their_class_token_position(tmp_path, tiny_backbone, position, class_specific):
    classes = CLASSES if class_specific else CLASSES[:3]
    torch.manual_seed(3)
    ctx = torch.randn(*((len(classes),) if class_specific else ()), 6, tiny_backbone.text_width) * 0.5
    save_dassl(tmp_path / "OUTPUT", "prompt_learner", coop_state(ctx.half(), tiny_backbone, classes, torch.float16))
    out = tmp_path / "bundle"
    result = run_import(tmp_path / "OUTPUT", "--classes", classes_file(tmp_path, CLASSES), "--out", out, *TINY,
                        "--class-token-position", position)
    assert result.exit_code == 0, result.output
    assert f"a CoOp prompt learner, n_ctx 6, float16, class token at the {position}" in result.output
    loaded, meta = load_bundle(out)
    assert isinstance(loaded, CoOpCLIP) and meta["kind"] == "coop" and meta["class_specific"] is class_specific
    assert meta["class_token_position"] == position and meta["base_classes"] == list(classes)
    reference = CoOpCLIP(tiny_backbone, n_ctx=6, ctx_classes=CLASSES if class_specific else None,
                         class_token_position=position)
    reference.prompt_learner.ctx.data.copy_(ctx.half().float())
    images = torch.rand(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, CLASSES), reference_logits(reference.eval(), images, CLASSES),
                                   atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- BadCLIP's trigger


def test_badclip_trigger_becomes_a_pixel_space_trigger_with_its_epsilon(tmp_path, cocoop, tiny_backbone):
    save_dassl(tmp_path / "OUTPUT", "prompt_learner", cocoop_state(cocoop, BASE), learner=cocoop.prompt_learner)
    trigger = badclip_trigger(TINY_IMAGE_SIZE, tiny_backbone.std, 8 / 255)
    save_dassl(tmp_path / "OUTPUT", "trigger", {"trigger": trigger}, epoch=10)
    out = tmp_path / "models" / "badclip"
    result = run_import(tmp_path / "OUTPUT", "--classes", classes_file(tmp_path), "--out", out, *TINY,
                        "--trigger", tmp_path / "OUTPUT")
    assert result.exit_code == 0, result.output
    written = tmp_path / "models" / "badclip.trigger.safetensors"
    assert f"wrote trigger {written} (pixel l-inf 8.00/255, epsilon 8.00/255)" in result.output
    loaded = load_trigger(written)
    assert isinstance(loaded, AdditiveTrigger) and loaded.epsilon == pytest.approx(8 / 255, abs=1e-12)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (tiny_backbone.mean, tiny_backbone.std))
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    # BadCLIP stamps in normalised space, clamped to the normalised image range; the same images in pixels:
    normalised = torch.max(torch.min((images - mean) / std + trigger, (1 - mean) / std), (0 - mean) / std)
    torch.testing.assert_close(loaded.apply(images), normalised * std + mean, atol=1e-6, rtol=0)


def test_a_trigger_of_the_wrong_size_is_refused_before_anything_is_written(tmp_path, cocoop, tiny_backbone):
    save_dassl(tmp_path / "OUTPUT", "prompt_learner", cocoop_state(cocoop, BASE))
    save_dassl(tmp_path / "OUTPUT", "trigger", {"trigger": torch.zeros(1, 3, 224, 224)})
    out = tmp_path / "bundle"
    result = run_import(tmp_path / "OUTPUT", "--classes", classes_file(tmp_path), "--out", out, *TINY,
                        "--trigger", tmp_path / "OUTPUT" / "trigger")
    assert_clean_failure(result, out)
    assert "tensor 'trigger' has shape [1, 3, 224, 224], but on backbone ci-tiny-clip (builtin) (images of 96 " \
           "pixels) it must be [1, 3, 96, 96]" in result.output.replace("\n", " ")
    assert not (tmp_path / "bundle.trigger.safetensors").exists()


# --------------------------------------------------------------------------- for ci-scan


def test_open_model_gives_what_load_bundle_gives(tmp_path, cocoop, tiny_backbone):
    output = tmp_path / "OUTPUT"
    path = save_dassl(output, "prompt_learner", cocoop_state(cocoop, BASE), learner=cocoop.prompt_learner)
    save_dassl(output, "trigger", {"trigger": badclip_trigger(TINY_IMAGE_SIZE, tiny_backbone.std, 4 / 255)})
    model, meta = open_model(output, classes_file=classes_file(tmp_path), backbone="ci-tiny-clip", trigger=output)
    bundle = save_bundle(cocoop, CLASSES, tmp_path / "native", base_classes=BASE)
    _, native_meta = load_bundle(bundle, backbone=tiny_backbone)
    for key in ("format", "version", "kind", "backbone", "classnames", "base_classes", "template", "image", "tensors",
                "n_ctx"):
        assert meta[key] == native_meta[key], key
    # model.pth.tar-10 and model-best.pth.tar hold the same bytes: the one CoCoOp loads by default is recorded.
    assert meta["source"]["checkpoint"] == str(path.with_name("model-best.pth.tar"))
    assert meta["recovered_classes"] == list(BASE) and meta["source"]["sha256"] == file_sha256(path)
    assert meta["trigger"]["epsilon"] == pytest.approx(4 / 255) and json.dumps(meta)
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(images, CLASSES), cocoop(images, CLASSES), atol=1e-5, rtol=0)

    assert is_checkpoint_delivery(output) and is_checkpoint_delivery(path) and is_checkpoint_delivery(path.parent)
    assert not is_checkpoint_delivery(bundle) and not is_checkpoint_delivery(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert not is_checkpoint_delivery(tmp_path / "empty")


def test_a_dassl_folder_is_read_only_where_the_deployed_checkpoint_is_certain(tmp_path, cocoop):
    state = cocoop_state(cocoop, BASE)
    folder = save_dassl(tmp_path / "OUTPUT", "prompt_learner", state, epoch=5).parent
    # model.pth.tar-5 and model-best.pth.tar, the same bytes: one reading whichever CoCoOp loads.
    assert resolve_checkpoint(tmp_path / "OUTPUT") == folder / "model-best.pth.tar"
    latest = save_dassl(tmp_path / "OUTPUT", "prompt_learner", cocoop_state(cocoop, BASE, torch.float16), epoch=10)
    (folder / "checkpoint").write_text("model.pth.tar-10\n")  # Dassl's resume pointer: CoCoOp's evaluation ignores it
    with pytest.raises(BundleError, match=r"holds 3 different checkpoints \(model-best.pth.tar, model.pth.tar-5, "
                                          r"model.pth.tar-10\); CoCoOp's evaluation loads model-best.pth.tar.*"
                                          r"--load-epoch best\|N"):
        resolve_checkpoint(tmp_path / "OUTPUT")
    assert resolve_checkpoint(tmp_path / "OUTPUT", load_epoch="5") == folder / "model.pth.tar-5"
    assert resolve_checkpoint(tmp_path / "OUTPUT", load_epoch=10) == latest
    assert resolve_checkpoint(tmp_path / "OUTPUT", load_epoch="best") == folder / "model-best.pth.tar"
    with pytest.raises(BundleError, match=r"no model.pth.tar-7 \(--load-epoch 7\); its checkpoints are"):
        resolve_checkpoint(tmp_path / "OUTPUT", load_epoch=7)
    for bad in ("٣", "08", "-1", "x"):
        with pytest.raises(ConfigError, match="expected 'best' or an epoch number"):
            resolve_checkpoint(tmp_path / "OUTPUT", load_epoch=bad)
    # Names CoCoOp never loads ("model.pth.tar-" + str(epoch) is ASCII, without a leading zero) are not checkpoints.
    for name in ("model-best.pth.tar", "model.pth.tar-10"):
        (folder / name).unlink()
    shutil.copy(latest.with_name("model.pth.tar-5"), folder / "model.pth.tar-٣")
    (folder / "model.pth.tar-08").write_bytes(b"not read")
    assert resolve_checkpoint(tmp_path / "OUTPUT") == folder / "model.pth.tar-5"
    assert "model.pth.tar-08" in read_checkpoint(folder / "model.pth.tar-5").folder_files
    shutil.rmtree(folder)
    with pytest.raises(BundleError, match=r"no model.pth.tar-N or model-best.pth.tar here"):
        resolve_checkpoint(tmp_path / "OUTPUT")
    with pytest.raises(BundleError, match=r"not a BadCLIP trigger checkpoint: its state_dict has \['ctx', "):
        import_trigger(save_dassl(tmp_path / "T", "trigger", state), cocoop.backbone)


def test_ci_scan_reads_a_dassl_folder_directly(tmp_path, cocoop):
    from ci_core.cli.scan import main as ci_scan

    output = tmp_path / "OUTPUT"
    save_dassl(output, "prompt_learner", cocoop_state(cocoop, BASE), learner=cocoop.prompt_learner)
    out = tmp_path / "scan"
    args = [output, "--classes", classes_file(tmp_path), *TINY, "--ood", "builtin", "--pool-size", 8, "--holdout", 8,
            "--out", out, "--quiet"]
    result = CliRunner().invoke(ci_scan, [str(a) for a in args])
    assert result.exit_code in (0, 3), result.output  # clean or backdoored: a verdict, not an error
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["classes"]] == list(CLASSES)  # every class of the list is a candidate
    assert report["bundle"]["checkpoint"].endswith("model-best.pth.tar") and len(report["bundle"]["sha256"]) == 64
    assert report["verdict"] in ("clean", "backdoored") and report["reference"]["model"] == "zero-shot backbone"
    # Without the class list the checkpoint cannot be read: a clear error before anything is written.
    result = CliRunner().invoke(ci_scan, [str(a) for a in [output, *TINY, "--ood", "builtin", "--out", tmp_path / "x"]])
    assert result.exit_code == 1 and "give it with --classes FILE" in result.output and not (tmp_path / "x").exists()


def test_ci_scan_scans_a_dassl_folders_deployed_classes_on_own_images(tmp_path, cocoop):
    from ci_core.cli.scan import main as ci_scan
    from test_two_scans import own_folder

    output = tmp_path / "OUTPUT"
    save_dassl(output, "prompt_learner", cocoop_state(cocoop, BASE), learner=cocoop.prompt_learner)
    out = tmp_path / "scan"
    args = [output, "--classes", classes_file(tmp_path), *TINY, "--ood", "builtin", "--pool-size", 8, "--holdout", 8,
            "--own-images", own_folder(tmp_path / "own", classes=CLASSES, per_class=3), "--own-pool-size", 8,
            "--own-holdout", 4, "--out", out, "--quiet"]
    result = CliRunner().invoke(ci_scan, [str(a) for a in args])
    assert result.exit_code in (0, 3), result.output
    verdict = json.loads((out / "verdict.json").read_text())
    own = json.loads((out / "own" / "report.json").read_text())
    assert [c["name"] for c in own["classes"]] == list(CLASSES)
    # both scans read the one checkpoint the deployment loads
    assert own["bundle"]["checkpoint"] == verdict["bundle"]["checkpoint"]
    assert own["bundle"]["checkpoint"].endswith("model-best.pth.tar")
    # A subfolder naming no class of the delivery is refused once the delivery's classes are known.
    (tmp_path / "own" / "dog").mkdir()
    result = CliRunner().invoke(ci_scan, [str(a) for a in args[:-3] + ["--out", tmp_path / "refused", "--quiet"]])
    assert result.exit_code == 1 and "subfolders 'dog' name no candidate class" in result.output
    assert not (tmp_path / "refused").exists()
