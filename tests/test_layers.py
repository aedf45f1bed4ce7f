"""The import layering of ``pyproject.toml``'s import-linter contracts holds, and no file imports itself
through others (function-local imports count: they run, only later)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from importlinter.api import read_configuration

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src"
CONTRACTS = read_configuration(str(ROOT / "pyproject.toml"))["contracts_options"]


@pytest.fixture(scope="module")
def lint_report() -> str:
    """The output of ``lint-imports`` over every contract (one import graph for all)."""
    paths = [str(SOURCE), *filter(None, [os.environ.get("PYTHONPATH")])]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    result = subprocess.run(
        [sys.executable, "-c", command, "--no-cache"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.stdout + result.stderr


@pytest.mark.parametrize("contract", CONTRACTS, ids=[contract["id"] for contract in CONTRACTS])
def test_import_contract_is_kept(lint_report, contract):
    assert f"{contract['name']} KEPT" in lint_report, lint_report


def module_imports(source_root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, from every ``import`` statement in each file.

    ``from a import b`` names module ``a.b`` when that is a module, else ``a``; relative imports are resolved.
    """
    files = {}
    for path in sorted((source_root / package).rglob("*.py")):
        parts = path.relative_to(source_root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        files[name] = (path, name if is_package else name.rpartition(".")[0])
    graph: dict[str, set[str]] = {}
    for name, (path, parent) in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = parent.split(".")[: len(parent.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in files else base)
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = lowlink[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    lowlink[node] = min(lowlink[node], index[child])
                continue
            work.pop()
            if work:
                lowlink[work[-1][0]] = min(lowlink[work[-1][0]], lowlink[node])
            if lowlink[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    cycles.append(sorted(group))
    return cycles


def test_cycle_finder_sees_function_local_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("from . import helper\n")
    (package / "sub" / "b.py").write_text("from ..c import X\n")
    (package / "sub" / "helper.py").write_text("import os\n")
    (package / "c.py").write_text("import pkg.a\nX = 1\n")
    graph = module_imports(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub"] == {"pkg.sub.helper"}
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert import_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (package / "c.py").write_text("X = 1\n")
    assert import_cycles(module_imports(tmp_path, "pkg")) == []


def test_no_import_cycle_between_files():
    cycles = import_cycles(module_imports(SOURCE, "megaclass"))
    groups = "; ".join("{" + ", ".join(group) + "}" for group in cycles)
    assert not cycles, f"files importing each other in a circle (function-local imports too): {groups}"
