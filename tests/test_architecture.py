"""The layers, read from the imports: impls computes, vectors holds the truth, conformance judges,
benchmarks measure. Imports flow one way, and no module imports itself back through another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Folder -> installed package, in layer order: a module may import its own layer or a lower one.
LAYERS = {
    "impls": "mha_conformance.impls",
    "vectors": "mha_conformance.vectors",
    "conformance": "mha_conformance",
}
LAYER_ORDER = ["mha_conformance.impls", "mha_conformance.vectors", "mha_conformance", "benchmarks"]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    folder, *rest = rel.parts
    parts = [LAYERS.get(folder, folder), *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    """The layer a module belongs to (the longest matching package prefix)."""
    for package in ("mha_conformance.impls", "mha_conformance.vectors", "benchmarks", "mha_conformance"):
        if module == package or module.startswith(package + "."):
            return package
    raise ValueError(module)


def modules() -> dict[str, Path]:
    found = {}
    for folder in [*LAYERS, "benchmarks"]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    every = modules()
    known = set(every)
    graph = {}
    for name, path in every.items():
        parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        graph[name] = imports(path, known) - {name} - parents  # a package's __init__ runs first anyway
    return graph


def test_no_module_imports_up_the_layers(graph):
    upward = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if LAYER_ORDER.index(layer(target)) > LAYER_ORDER.index(layer(module))
    ]
    assert not upward, "imports must flow impls -> vectors -> conformance -> benchmarks:\n" + "\n".join(
        upward
    )


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: every component must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_reference_imports_nothing_but_numpy():
    tree = ast.parse((ROOT / "impls" / "reference.py").read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"numpy", "__future__", "collections", "dataclasses", "typing"}, imported


def test_every_folder_is_an_installed_package():
    """Each folder of Python modules under impls/, vectors/ and conformance/ is a regular package
    (has ``__init__.py``) and is listed in pyproject.toml, so a wheel ships all of it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    problems = []
    for folder in LAYERS:
        for init_dir in sorted({p.parent for p in (ROOT / folder).rglob("*.py")}):
            package = module_name(init_dir / "__init__.py")
            if not (init_dir / "__init__.py").exists():
                problems.append(f"{init_dir.relative_to(ROOT)} has no __init__.py")
            if package not in listed:
                problems.append(f"{package} is not in pyproject.toml's [tool.setuptools] packages")
    assert not problems, problems
