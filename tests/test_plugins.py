import json
import os
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file


from ci_core.cli.bench import main as bench
from ci_core.errors import DataError, PluginError
from ci_core.plugins import KINDS, Registry, plugin_manager, registry
from ci_core.plugins import load_trigger

FAKE_MODULE = '''
from ci_core import hookimpl
from ci_attacks.clean import CleanPromptTuning


class ThirdPartyAttack(CleanPromptTuning):
    name = "third-party"
    description = "an attack from another distribution"


@hookimpl
def register_attacks(register):
    register(ThirdPartyAttack)
'''


def install_fake_distribution(root, name="fake_ci_plugin", module_source=FAKE_MODULE):
    """A real (if minimal) installed distribution on sys.path, with a clip_inspector entry point."""
    (root / f"{name}.py").write_text(module_source)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[clip_inspector]\n{name} = {name}\n")


def activate_fake_distribution(root, monkeypatch, name, module_source):
    """Install a fake distribution under ``root`` and make it visible to this process and to its children.

    Children (``ci-bench`` workers, Ray tasks) find it through PYTHONPATH; the caller clears
    ``registry`` again when done.
    """
    root.mkdir(exist_ok=True)
    install_fake_distribution(root, name, module_source)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    registry.cache_clear()
    return root


@pytest.fixture()
def fake_plugin(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.cache_clear()
    yield
    registry.cache_clear()


def test_first_party_plugins_come_from_the_entry_points():
    reg = Registry(plugin_manager())
    assert {"clean", "badclip"} <= set(reg.names("attack"))
    assert reg.names("detector")[:1] == ["ci"]
    assert {"tiny-colorshapes", "tiny-patterns", "tiny-palette"} <= set(reg.names("dataset"))
    first_party = [e for e in reg.entries() if e.cls.__module__.split(".")[0] in ("ci_core", "ci_attacks", "ci_detectors")]
    assert first_party and all(e.distribution.startswith("clip-inspector ") for e in first_party)


def test_no_entry_points_means_no_plugins():
    reg = Registry(plugin_manager(load_entrypoints=False))
    assert all(reg.names(kind) == [] for kind in KINDS)


def test_third_party_distribution_is_discovered(fake_plugin):
    reg = Registry(plugin_manager())
    entry = [e for e in reg.entries() if e.name == "third-party"]
    assert len(entry) == 1 and entry[0].kind == "attack" and entry[0].distribution == "fake-ci-plugin 0.1"


def test_plugins_command_lists_distribution(fake_plugin):
    result = CliRunner().invoke(bench, ["plugins"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if "third-party" in l)
    assert line.split()[:2] == ["attack", "third-party"] and "fake-ci-plugin 0.1" in line
    assert any(l.split()[:2] == ["detector", "ci"] for l in result.output.splitlines())


def test_duplicate_name_names_both_classes(tmp_path, monkeypatch):
    clash = FAKE_MODULE.replace('name = "third-party"', 'name = "badclip"')
    install_fake_distribution(tmp_path, "clashing_plugin", clash)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"attack name 'badclip' is registered twice") as info:
        Registry(plugin_manager())
    assert "ci_attacks.badclip.BadCLIP (clip-inspector" in str(info.value)
    assert "clashing_plugin.ThirdPartyAttack (clashing-plugin 0.1)" in str(info.value)


def test_unknown_name_lists_available_and_names_distribution():
    reg = Registry(plugin_manager(blocked=["ci_detectors_nc"]))  # as if ci-detectors-nc were not installed
    with pytest.raises(PluginError, match=r"unknown attack 'nope'\. Available attacks: clean, badclip"):
        reg.get("attack", "nope")
    with pytest.raises(PluginError, match=r"pip install ci-detectors-nc"):
        reg.get("detector", "nc")


# --------------------------------------------------------------------------- trigger kinds that plugins define

TRIGGER_PLUGIN = FAKE_MODULE + '''
from ci_core.triggers import Trigger


class NegativeTrigger(Trigger):
    kind = "fake-negative"

    def __init__(self, strength):
        self.strength = strength

    def apply(self, images):
        return images + self.strength * (1 - 2 * images)

    def tensors(self):
        return {"strength": self.strength}

    @classmethod
    def from_saved(cls, tensors, params):
        return cls(tensors["strength"])


@hookimpl
def register_triggers(register):
    register(NegativeTrigger)
'''


def save_by_hand(path, kind):
    """A trigger file and its sidecar as another process (with the plugin imported) would have written them."""
    save_file({"strength": torch.tensor([0.5])}, str(path))
    path.with_name(path.name + ".json").write_text(json.dumps({"kind": kind, "params": {}}))
    return path


@pytest.fixture()
def fresh_registry():
    registry.cache_clear()  # plugins a test installs are forgotten after
    yield
    registry.cache_clear()


def test_a_trigger_kind_is_registered_like_any_plugin_class(tmp_path, monkeypatch, fresh_registry):
    install_fake_distribution(tmp_path, "trigger_plugin", TRIGGER_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = save_by_hand(tmp_path / "negative.safetensors", "fake-negative")
    assert "trigger_plugin" not in sys.modules
    try:
        trigger = load_trigger(path)  # the registry finds the kind through the plugin's register_triggers
        assert type(trigger).__module__ == "trigger_plugin" and type(trigger).kind == "fake-negative"
        assert torch.allclose(trigger.apply(torch.tensor([0.0, 1.0])), torch.tensor([0.5, 0.5]))
        entry = next(e for e in registry().entries() if e.kind == "trigger" and e.name == "fake-negative")
        assert entry.distribution.startswith("trigger-plugin")
    finally:
        sys.modules.pop("trigger_plugin", None)


def test_unknown_trigger_kind_names_the_kind_the_file_and_the_known_kinds(tmp_path, fresh_registry):
    path = save_by_hand(tmp_path / "odd.safetensors", "no-such-kind")
    with pytest.raises(DataError, match=r"odd\.safetensors\.json: unknown trigger 'no-such-kind'\. "
                                        r"Available triggers: .*additive"):
        load_trigger(path)
    path.with_name(path.name + ".json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"odd\.safetensors\.json: holds an array, not a JSON object; "
                                        r"expected a trigger description"):
        load_trigger(path)
