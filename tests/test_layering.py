"""The layering rule of ARCHITECTURE.md, read from the source: imports point down, and none runs in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ci_core", "ci_attacks", "ci_detectors", "ci_repairers")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(f): f for package in PACKAGES for f in (ROOT / package).rglob("*.py")}


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
    if name.startswith("ci_core.cli"):
        return "cli"
    if name.startswith("ci_core.harness"):
        return "harness"
    return "core" if name.startswith("ci_core") else "plugin"


def test_imports_point_down_the_layers():
    allowed = {"cli": {"cli", "harness", "core"}, "harness": {"harness", "core"}, "core": {"core"},
               "plugin": {"core", "plugin"}}
    upward = [(name, dep) for name, deps in graph(module_level=False).items() for dep in deps
              if layer(dep) not in allowed[layer(name)]]
    assert upward == []


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
