"""The layering rule of ARCHITECTURE.md, read from the source: imports point down, and none runs in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each source folder and the folder its modules are imported from: the packages at the root, the separately
# installable plugin distributions under plugins/ (each imported from its own folder), and the programs.
FOLDERS = {ROOT / "ci_core": ROOT, ROOT / "ci_attacks": ROOT, ROOT / "ci_detectors": ROOT,
           ROOT / "ci_repairers": ROOT, ROOT / "benchmarks": ROOT, ROOT / "scripts": ROOT,
           **{package: package.parent for package in (ROOT / "plugins").glob("*/ci_*") if package.is_dir()}}
PROGRAMS = ("benchmarks", "scripts")


def module_name(path: Path, base: Path = ROOT) -> str:
    parts = path.relative_to(base).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(f, base): f for folder, base in FOLDERS.items() for f in folder.rglob("*.py")
            if "tests" not in f.relative_to(folder).parts}


def imports(path: Path, known: set[str], *, module_level: bool) -> set[str]:
    """The known modules ``path`` imports (at import time only, if ``module_level``; TYPE_CHECKING blocks never)."""
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            nodes = [n for n in ast.walk(node) if isinstance(n, (ast.expr, ast.arguments))]  # decorators, bases
        else:
            nodes = list(ast.walk(node))
        for sub in nodes:
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                for alias in sub.names:
                    full = f"{sub.module}.{alias.name}"
                    found.add(full if full in known else sub.module)
            elif isinstance(sub, ast.Import):
                found.update(alias.name for alias in sub.names)
    return {name for name in found if name in known}


def graph(*, module_level: bool) -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, set(known), module_level=module_level) - {name} for name, path in known.items()}


def layer(name: str) -> str:
    """cli, harness, core, program (benchmarks/, scripts/), or "plugin:<package>" (each plugin package its own)."""
    top = name.split(".")[0]
    if top in PROGRAMS:
        return "program"
    if name.startswith("ci_core.cli"):
        return "cli"
    if name.startswith("ci_core.harness"):
        return "harness"
    return "core" if top == "ci_core" else f"plugin:{top}"


def allowed(layer_name: str, dep_layer: str) -> bool:
    """ARCHITECTURE.md's table: imports point down; a plugin package imports the core and itself only; the
    programs (benchmarks, scripts) may import anything but one another, and nothing imports them."""
    if layer_name == "program":
        return dep_layer != "program"
    if layer_name.startswith("plugin:"):
        return dep_layer in ("core", layer_name)
    return dep_layer in {"cli": ("cli", "harness", "core"), "harness": ("harness", "core"), "core": ("core",)}[layer_name]


def test_every_folder_is_read():
    names = modules()
    for expected in ("ci_core.scanning.scan", "ci_core.learning.protocol", "ci_core.models.delivery",
                     "ci_core.models.class_names", "ci_attacks.plugin", "ci_detectors_nc.plugin",
                     "ci_detectors_pixb.plugin", "benchmarks.hostile_inputs", "scripts.train_tiny_clip"):
        assert expected in names


def test_imports_point_down_the_layers():
    upward = [(name, dep) for name, deps in graph(module_level=False).items() for dep in deps
              if not allowed(layer(name), layer(dep))]
    assert upward == []


# What a program may take from the CLI: its commands and the click helpers every command shares.
CLI_FACE = {"main", "report_errors", "echo_table", "parse_options", "data_root_option", "runtime_options",
            "backbone_options"}


# The core's stage folders, in the order a model goes through them. A stage may import the stages before it
# (data/ and models/ share one rank: a dataset loads its backbone, a bundle checks its class names) and the
# root's plugin machinery and foundation, never a later stage.
STAGES = {"ci_core.data": 0, "ci_core.models": 0, "ci_core.learning": 1, "ci_core.scanning": 2, "ci_core.pages": 3}


def stage(name: str) -> int | None:
    return next((rank for folder, rank in STAGES.items() if name == folder or name.startswith(folder + ".")), None)


def test_core_stages_never_import_a_later_stage():
    backward = [(name, dep) for name, deps in graph(module_level=False).items() for dep in deps
                if stage(name) is not None and stage(dep) is not None and stage(dep) > stage(name)]
    assert backward == []


def test_programs_take_only_commands_and_click_helpers_from_the_cli():
    # A benchmark is a small command of its own: it may run the toolkit's commands and share the CLI's click
    # helpers, but what it computes comes from the library (runtime, data, harness), never from a CLI module.
    taken = []
    for name, path in modules().items():
        if layer(name) != "program":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ci_core.cli"):
                taken += [(name, f"{node.module}.{alias.name}") for alias in node.names if alias.name not in CLI_FACE]
    assert taken == []


def test_a_plugin_package_never_imports_another():
    edges = graph(module_level=False)
    crossing = [(name, dep) for name, deps in edges.items() for dep in deps
                if layer(name).startswith("plugin:") and layer(dep).startswith("plugin:") and layer(dep) != layer(name)]
    assert crossing == []


def test_no_import_cycle_at_import_time():
    edges = graph(module_level=True)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checks_see_an_upward_import(tmp_path):
    # The rule's own reader must find what it forbids: a core module importing the CLI, in a function body.
    fake = tmp_path / "ci_core" / "fake.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from ci_core.cli.common import report_errors\n", encoding="utf-8")
    assert imports(fake, {"ci_core.cli.common"}, module_level=False) == {"ci_core.cli.common"}
    assert imports(fake, {"ci_core.cli.common"}, module_level=True) == set()
