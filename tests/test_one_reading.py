"""A delivery has one reading, the deployment's; class lists cannot hide a class; nothing a provider wrote reaches
the terminal raw; no input ends in a traceback."""

import re

import click
import pytest
import torch
from click.testing import CliRunner

from ci_core.models.class_names import MAX_CLASSES, check_class_names, class_key, read_class_list
from ci_core.cli.common import report_errors
from ci_core.models.delivery import read_checkpoint
from ci_core.errors import BundleError, DataError

from delivery_layout import cocoop_state, save_dassl
from test_checkpoint_import import BASE, CLASSES, TINY, classes_file, cocoop, run_import  # noqa: F401 - fixture


def test_module_prefixed_keys_are_refused_as_cocoops_loader_ignores_them(tmp_path, cocoop):  # noqa: F811
    state = cocoop_state(cocoop, BASE)
    # Measured: load_state_dict(strict=False), as CoCoOp's load_model calls it, deploys 'ctx' and ignores
    # 'module.ctx'; the old reader stripped the prefix and let the later (clean) key win.
    both = {**state, **{f"module.{k}": torch.zeros_like(v) for k, v in state.items()}}
    path = save_dassl(tmp_path / "both", "prompt_learner", both)
    with pytest.raises(BundleError, match=r"holds both 'ctx' and 'module.ctx' \(7 such pairs\): CoCoOp's "
                                          r"load_model\(strict=False\) deploys the unprefixed key"):
        read_checkpoint(path)
    only = save_dassl(tmp_path / "only", "prompt_learner", {f"module.{k}": v for k, v in state.items()})
    with pytest.raises(BundleError, match=r"keys carry the 'module.' prefix .* ignores \(it would deploy an untrained"):
        read_checkpoint(only)
    read = read_checkpoint(save_dassl(tmp_path / "plain", "prompt_learner", state))
    assert read.keys == tuple(state) and "model-best.pth.tar" in read.folder_files


def test_class_lists_refuse_twins_unprintable_names_and_excess_in_linear_time(tmp_path):
    assert class_key("Yellow_Stripes ") == class_key("yellow  stripes") == "yellow stripes"
    with pytest.raises(DataError, match=r"class 3 'Yellow Stripes' and 'yellow stripes' are one class to CLIP"):
        check_class_names(["yellow stripes", "red", "Yellow Stripes"], "list")
    # NFC: a decomposed "é" is the composed one.
    assert check_class_names(["cafe\u0301", "tea"], "list") == ("caf\u00e9", "tea")
    with pytest.raises(DataError, match=r"'caf\u00e9' is repeated"):
        check_class_names(["caf\u00e9", "cafe\u0301"], "list")
    for bad, code in (("a\x00b", "U+0000"), ("a\u2028b", "U+2028"), ("a\u202eb", "U+202E"), ("a\x1b]0;t\x07", "U+001B")):
        with pytest.raises(DataError, match=rf"class 2 .* holds the unprintable character {re.escape(code)}"):
            check_class_names(["ok", bad], "list")
    with pytest.raises(DataError, match=r"class 1 .* must be 1 to 300 characters, has 5000"):
        check_class_names(["x" * 5000], "list")
    with pytest.raises(DataError, match=rf"4097 class names, more than the {MAX_CLASSES} allowed"):
        check_class_names([f"c{k}" for k in range(MAX_CLASSES + 1)], "list")
    # The old duplicate check was quadratic; benchmarks/hostile_inputs.py (group 8) times the new one beside it.
    assert len(check_class_names([f"class {k}" for k in range(MAX_CLASSES)], "list")) == MAX_CLASSES

    big = tmp_path / "million.txt"
    big.write_text("".join(f"c{k}\n" for k in range(1_000_000)))
    with pytest.raises(DataError, match=r"million.txt: 1000000 class names, more than the 4096 allowed"):
        read_class_list(big)
    separators = tmp_path / "separators.txt"
    separators.write_text("red circle\u2028yellow stripes\nblue square\r\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"separators.txt: class 1 .* U\+2028"):  # one line, not two classes
        read_class_list(separators)


def test_ci_import_prints_provider_text_escaped(tmp_path, cocoop):  # noqa: F811
    state = cocoop_state(cocoop, BASE)
    title, clipboard = "\x1b]0;owned\x07", "\x1b]52;c;ZWNobyBoaQ==\x07"
    save_dassl(tmp_path / "OUTPUT", "prompt_learner", state, extra={title: 1, f"\nverdict: CLEAN{clipboard}": 2})
    result = run_import(tmp_path / "OUTPUT", "--classes", classes_file(tmp_path), "--out", tmp_path / "b", *TINY)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert not any(line.startswith("verdict") for line in result.output.splitlines())
    assert r"\x1b]0;owned\x07" in result.output


def test_an_unexpected_exception_ends_in_one_line_and_status_1():
    @click.command()
    @report_errors
    def broken():
        raise TypeError("unsupported operand\nTraceback (most recent call last): \x1b[2J")

    result = CliRunner().invoke(broken, [])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: unexpected TypeError: unsupported operand\\n")
    assert "please report it" in lines[0] and "\x1b" not in result.output
