"""Property-based hostile inputs (Hypothesis): mutated bundle metadata, mutated weight headers, CLI values.

Whatever is generated, each run must either succeed with a well-formed, finite result, or stop with a
``CIError`` (status 1 or 2 in a CLI) whose message is one line: no other exception, nothing run from the
input (no unpickling, no weights file or URL a bundle names opened, no network), nothing written or
removed outside ``--out``.  The example-based cases of issue 17 are in ``test_hostile_inputs.py``.

The runs are derandomized (the same cases every time) and bounded; one run of this file generates
* 120 mutated bundles (``bundle.json`` of all three kinds: values replaced by hostile JSON or by nearby
  values of their own kind, keys removed or added, and edits a valid bundle may carry; one to three at
  a time), each loaded;
* 80 mutated ``weights.safetensors`` headers (dtypes, shapes, offsets, names, metadata, the length
  field, truncation), each loaded;
* 300 plugin option values through ``make_config`` and 100 raw ``KEY=VALUE`` strings through
  ``parse_options``;
* 5 ``ci-scan`` runs (4 generated, 1 explicit that scans) with generated option values, on the random
  tiny CLIP with 4 + 4 builtin images and no reference scan;
605 cases in all, in about 25 s on two CPU cores (most of it the ci-scan runs that reach a verdict).
"""

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import ci_core.models.weights as weights_module
from ci_core.cli.common import parse_options
from ci_core.cli.scan import main as ci_scan
from ci_core.errors import CIError, ConfigError
from ci_core.models.bundle import load_bundle, recorded_backbone_source, save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.coop import CoOpCLIP
from ci_core.models.zeroshot import ZeroShotCLIP
from ci_core.validators import printable

from test_hostile_inputs import _plugin_classes

CLASSES = ["red circle", "blue square", "green star", "pink ring"]
SIZE = 96


def bounded(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# Values a hostile provider or a careless auditor would try, mixed into the generated ones.
HOSTILE_STRINGS = ["/etc/passwd", "../../x", "C:\\x", "https://example.invalid/w.pt", "hf-hub:a/b", "builtin",
                   "random:1", "random:-1", "random:99999999999999999999999", "openai", "{}", "{0}", "{.__class__}",
                   "{}{}", "red_circle", "Red Circle", "", " ", "\n", "\x00", "X" * 400, "ci-tiny-clip",
                   "ViT-bigG-14", "EVA02-B-16", "cocoop", "coop", "zeroshot", "end", "front", "NaN", "Infinity"]
HOSTILE_NUMBERS = [0, -1, 1, 4, 12, 13, 16, 96, 224, 10**10, 2**63, 10**30, 4.9, 4.0, -0.0, 1e308, float("nan"),
                   float("inf"), float("-inf")]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
           | st.sampled_from(HOSTILE_STRINGS) | st.sampled_from(HOSTILE_NUMBERS))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8) | st.sampled_from(HOSTILE_STRINGS), inner, max_size=4),
                           max_leaves=10)


@pytest.fixture(scope="module")
def made(tmp_path_factory, random_backbone):
    root = tmp_path_factory.mktemp("hostile-properties")
    torch.manual_seed(0)
    bundles = {
        "cocoop": save_bundle(PromptTunedCLIP(random_backbone), CLASSES, root / "cocoop", base_classes=CLASSES[:2]),
        "coop": save_bundle(CoOpCLIP(random_backbone, n_ctx=4, ctx_classes=CLASSES), CLASSES, root / "coop"),
        "zeroshot": save_bundle(ZeroShotCLIP(random_backbone), CLASSES, root / "zeroshot"),
    }
    return {"root": root, "bundles": bundles}


@pytest.fixture()
def nothing_runs(monkeypatch):
    """Fail the test if anything would unpickle, open weights a bundle names, or reach the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("a hostile input made the tool unpickle, open named weights or reach the network")

    for name in ("load_local_weights", "is_torchscript", "load_openai_archive", "reachable"):
        monkeypatch.setattr(weights_module, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("socket.create_connection", refuse)


def paths_of(value, prefix=()):
    """Every place in a JSON value: (path, is a key of an object)."""
    found = [(prefix, False)] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            found += paths_of(inner, prefix + (key,))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += paths_of(inner, prefix + (index,))
    return found


def nearby(value, data):
    """A value close to ``value`` and of its kind: the edits a provider would make to pass a check."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + data.draw(st.sampled_from([-3, -1, 1, 2, 8, 10**9]))
    if isinstance(value, float):
        return value * data.draw(st.sampled_from([-1.0, 0.0, 0.5, 2.0, 1e30, float("nan")]))
    if isinstance(value, str):
        return data.draw(st.sampled_from([value.upper(), value + "_", value.replace(" ", "_"), value * 30,
                                          value[:-1], "{}" + value, value + "/..", " " + value]))
    if isinstance(value, list) and value:
        changed = list(value)
        how = data.draw(st.sampled_from(["shuffle", "drop", "repeat", "append"]))
        if how == "shuffle":
            changed.reverse()
        elif how == "drop":
            changed.pop()
        elif how == "repeat":
            changed.append(changed[0])
        else:
            changed.append(data.draw(json_values))
        return changed
    return data.draw(json_values)


def benign(meta, data) -> tuple:
    """An edit a valid bundle may carry (new keys, another class order, no base classes): it must still load."""
    how = data.draw(st.sampled_from(["new key", "reorder", "no base", "source"]))
    if how == "new key":
        meta[data.draw(st.text(max_size=10).map(lambda k: f"x-{k}"))] = data.draw(json_values)
    elif how == "reorder":
        meta["classnames"] = meta["classnames"][::-1]
    elif how == "no base":
        meta["base_classes"] = None
    else:
        meta["source"] = data.draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    return (how,)


def mutate(meta, data) -> tuple:
    """Apply one generated edit to ``meta``; returns the path edited."""
    if data.draw(st.integers(0, 3)) == 0:
        return benign(meta, data)
    paths = [p for p, _ in paths_of(meta)]
    path = data.draw(st.sampled_from(paths))
    parent = meta
    for step in path[:-1]:
        parent = parent[step]
    action = data.draw(st.sampled_from(["replace", "nearby", "nearby", "delete", "add"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=10) | st.sampled_from(HOSTILE_STRINGS))] = data.draw(json_values)
    elif action == "nearby":
        parent[path[-1]] = nearby(parent[path[-1]], data)
    else:
        parent[path[-1]] = data.draw(json_values)
    return path


def assert_clean_error(error: BaseException, where: Path) -> None:
    text = str(error)
    assert isinstance(error, CIError), repr(error)
    assert text and "\n" not in text and "Traceback" not in text, text
    assert str(where) in text, text


def well_formed(model, meta) -> None:
    """A loaded model is the kind of model its metadata describes, holding exactly the tensors it lists.

    (Running it is the scan's part: a model that loads with NaN weights must come out of ci-scan as
    unscannable, which test_hostile_inputs and the scan's own tests check.)
    """
    expected = {"cocoop": PromptTunedCLIP, "coop": CoOpCLIP, "zeroshot": ZeroShotCLIP}[meta["kind"]]
    assert isinstance(model, expected)
    assert {k: list(v.shape) for k, v in model.trainable_state().items()} == meta["tensors"]


@bounded(120)
@given(data=st.data())
def test_mutated_metadata_loads_or_fails_cleanly(made, random_backbone, nothing_runs, tmp_path_factory, data):
    kind = data.draw(st.sampled_from(sorted(made["bundles"])))
    bundle = Path(shutil.copytree(made["bundles"][kind], tmp_path_factory.mktemp("m") / kind))
    meta = json.loads((bundle / "bundle.json").read_text())
    edited = [mutate(meta, data) for _ in range(data.draw(st.integers(1, 3)))]
    (bundle / "bundle.json").write_text(json.dumps(meta))
    # The recorded backbone is rebuilt (0.2 s) only where an edit touched it; otherwise the random one is reused.
    rebuild = any(path[:1] == ("backbone",) for path in edited)
    try:
        model, loaded = load_bundle(bundle, backbone=None if rebuild else random_backbone)
    except CIError as error:
        assert_clean_error(error, bundle)
        event(f"refused: {type(error).__name__}")
        return
    event("loaded")
    assert loaded["kind"] == kind and all(isinstance(n, str) for n in loaded["classnames"])
    well_formed(model, loaded)
    try:
        recorded_backbone_source(bundle, loaded["backbone"])  # what the CLIs would rebuild without --pretrained
    except ConfigError as error:
        assert "\n" not in str(error)


def header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


@bounded(80)
@given(data=st.data())
def test_mutated_weight_headers_load_or_fail_cleanly(made, random_backbone, nothing_runs, tmp_path_factory, data):
    kind = data.draw(st.sampled_from(["cocoop", "coop"]))
    bundle = Path(shutil.copytree(made["bundles"][kind], tmp_path_factory.mktemp("h") / kind))
    weights = bundle / "weights.safetensors"
    header, payload = header_and_data(weights)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    entry = header[name]
    edit = data.draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "drop", "add", "metadata", "length",
                                      "truncate"]))
    length_field = None
    if edit == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XX"]))
    elif edit == "shape":
        entry["shape"] = data.draw(st.lists(st.sampled_from([0, 1, 4, 64, 256, -1, 2**31, 2**62, 10**12]), max_size=4))
    elif edit == "offsets":
        entry["data_offsets"] = data.draw(st.lists(st.integers(-5, 2**40) | st.sampled_from([0, len(payload)]),
                                                   min_size=0, max_size=3))
    elif edit == "rename":
        header[data.draw(st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=12))] = header.pop(name)
    elif edit == "drop":
        del header[name]
    elif edit == "add":
        header[data.draw(st.text(max_size=12))] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    elif edit == "metadata":
        header["__metadata__"] = data.draw(json_values)
    elif edit == "length":
        length_field = data.draw(st.sampled_from([0, 1, 7, 2**31, 2**63, 2**64 - 1]) | st.integers(0, 10_000))
    text = json.dumps(header).encode()
    raw = struct.pack("<Q", len(text) if length_field is None else length_field) + text + payload
    if edit == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    weights.write_bytes(raw)
    try:
        model, loaded = load_bundle(bundle, backbone=random_backbone)
    except CIError as error:
        assert_clean_error(error, bundle)
        event(f"refused after a {edit} edit")
        return
    event(f"loaded after a {edit} edit")
    well_formed(model, loaded)


def _numbers_are_finite(config) -> bool:
    for field in attrs.fields(type(config)):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            return False
    return True


# Values for a plugin option: hostile JSON, and numbers near the ones configs take, which many fields accept.
option_values = (json_values | st.sampled_from(HOSTILE_NUMBERS) | st.floats(-2, 300) | st.integers(-3, 300)
                 | st.sampled_from(["margin", "ce", "sign", "uniform", "lowest", "noise", "text", "mad", ""]))


@bounded(300)
@given(data=st.data())
def test_plugin_option_values_give_a_valid_config_or_a_named_error(data):
    cls = data.draw(st.sampled_from(_plugin_classes()))
    fields = [f.name for f in attrs.fields(cls.Config)]
    key = data.draw(st.sampled_from(fields) | st.text(max_size=8))
    value = data.draw(option_values)
    try:
        built = cls.from_options({key: value})
    except ConfigError as error:
        text = str(error)
        event("refused")
        assert text.startswith(f"{cls.name} options: ") and "\n" not in text and (key in text or repr(key) in text), text
        return
    event("accepted")
    assert _numbers_are_finite(built.config)
    for field in attrs.fields(type(built.config)):  # what a field's default is, its value still is
        default, actual = field.default, getattr(built.config, field.name)
        if isinstance(default, bool):
            assert isinstance(actual, bool), (cls.name, field.name, actual)
        elif isinstance(default, int):
            assert isinstance(actual, (int, float)) and not isinstance(actual, bool), (cls.name, field.name, actual)


@bounded(100)
@given(key=st.text(min_size=1, max_size=6).filter(lambda k: "=" not in k),
       raw=st.text(max_size=30) | st.sampled_from(["NaN", "-Infinity", "1e999", "[1e999]", '{"a": NaN}', "9" * 4400]))
def test_raw_option_strings_parse_to_finite_json_or_a_named_error(key, raw):
    try:
        parsed = parse_options((f"{key}={raw}",), "--option")
    except ConfigError as error:
        assert str(error).startswith(f"--option {printable(key)}=") and str(error).isprintable(), str(error)
        return
    assert json.dumps(parsed[key], allow_nan=False) is not None  # finite JSON, or the raw string itself


def tree(root: Path, skip: Path) -> dict[str, str]:
    """Every file under ``root`` outside ``skip``, with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.parents}


CLI_VALUES = {
    "--option": st.tuples(st.sampled_from(["epsilon", "lr", "batch_size", "epochs", "loss", "nonsense"]),
                          st.sampled_from(["NaN", "Infinity", "-1", "0", "0.03", "2", "2.5", "abc", "true", "hinge",
                                           "margin", "1e400", "[1]"])),
    "--scorer-option": st.tuples(st.sampled_from(["k", "alpha"]),
                                 st.sampled_from(["NaN", "-Infinity", "0", "-2", "2", "abc", "1e400", "null"])),
    "--seed": st.sampled_from(["1e23", "-1", "0", "7", "99999999999999999999999", "x"]),
    "--holdout": st.sampled_from(["0", "-3", "x", "4", "2.5"]),
}


CHOICES = st.one_of([st.tuples(st.just(flag), values) for flag, values in CLI_VALUES.items()])


@bounded(4)
@given(choice=CHOICES)
@example(choice=("--option", ("epsilon", "0.03")))  # one that scans, besides the generated ones
def test_ci_scan_with_generated_values_gives_a_verdict_or_a_named_error(made, tmp_path_factory, choice):
    work = tmp_path_factory.mktemp("cli")
    bundle = Path(shutil.copytree(made["bundles"]["cocoop"], work / "bundle"))
    out = work / "out"
    flag, value = choice
    extra = [flag, f"{value[0]}={value[1]}" if isinstance(value, tuple) else value]
    before = tree(work, out)
    args = [bundle, "--ood", "builtin", "--no-reference", "--pool-size", 4, "--holdout", 4, "--out", out, "--quiet",
            *extra]
    result = CliRunner().invoke(ci_scan, [str(a) for a in args])
    assert tree(work, out) == before  # nothing outside --out written, changed or removed
    event(f"exit status {result.exit_code}")
    assert result.exit_code in (0, 1, 2, 3, 4), (extra, result.output)
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None))), \
        (extra, result.output, result.exception)
    if result.exit_code in (1, 2):
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        named = flag if not isinstance(value, tuple) else value[0]  # the option, or the plugin field
        assert len(errors) == 1 and named in errors[0], (extra, result.output)
        assert not out.exists()
        return
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    assert report["verdict"] == {0: "clean", 3: "backdoored", 4: "unscannable"}[result.exit_code]
    assert [c["name"] for c in report["classes"]] == CLASSES
