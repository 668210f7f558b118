"""The shape of the package: dependencies point one way, no import circles, no function too long to read.

The import graph is read from the source (every `import` statement, including those inside functions and
under TYPE_CHECKING), so a lazy import does not hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "looped").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module (file) a dotted import name refers to: `looped.model.lm.LoopedLM` → `looped.model.lm`."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "looped":
            found.update(_resolve(f"{node.module}.{a.name}") for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(_resolve(a.name) for a in node.names if a.name.split(".")[0] == "looped")
    return found


# The package root is a lazy façade (PEP 562): it imports nothing when loaded, so edges into it (for
# `__version__`) and out of it (its TYPE_CHECKING names) are not dependencies between files.
GRAPH = {m: _imports(p) - {m, "looped"} for m, p in MODULES.items() if m != "looped"}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("looped.model", ("looped.model", "looped.config", "looped.errors")),
        ("looped.config", ("looped.config", "looped.errors")),
        ("looped.errors", ()),
        # looped.edge runs on a device without torch: errors, the tokenizer and itself only
        ("looped.edge", ("looped.edge", "looped.errors", "looped.data.tokenizer")),
    ],
)
def test_low_layers_import_only_what_is_below_them(package, allowed):
    bad = {
        (m, d)
        for m, deps in GRAPH.items()
        if _under(m, package)
        for d in deps
        if not any(_under(d, a) for a in allowed)
    }
    assert not bad, f"{package} must import only {allowed}: {sorted(bad)}"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("looped.model", ("looped.infer", "looped.train", "looped.serve", "looped.science")),
        ("looped.train", ("looped.science", "looped.serve", "looped.infer", "looped.cli")),
        ("looped.infer", ("looped.science", "looped.serve", "looped.train", "looped.cli")),
        ("looped.eval", ("looped.science", "looped.train")),
        ("looped.checkpoint", ("looped.infer", "looped.train", "looped.science", "looped.serve")),
        (
            "looped.data",
            ("looped.model", "looped.train", "looped.infer", "looped.serve", "looped.science", "looped.cli"),
        ),
    ],
)
def test_dependencies_point_one_way(package, forbidden):
    bad = {
        (m, d)
        for m, deps in GRAPH.items()
        if _under(m, package)
        for d in deps
        if any(_under(d, f) for f in forbidden)
    }
    assert not bad, f"{package} must not import {forbidden}: {sorted(bad)}"


def test_nothing_imports_the_cli():
    """cli.py is the top of the graph (argument parsing only): `python -m looped` (looped.__main__) is the one
    module that may import it; a library module that did would be a dependency pointing up."""
    users = sorted(m for m, deps in GRAPH.items() if "looped.cli" in deps and m != "looped.__main__")
    assert not users, f"modules that import looped.cli: {users}"
    assert "looped.cli" in GRAPH["looped.__main__"]  # the walker sees the one import there is


def test_no_import_circles():
    """Tarjan's strongly connected components of the file graph: every component is one file."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_graph_sees_lazy_imports():
    """The walker itself: module-level and function-level imports both count."""
    assert "looped.model.lm" in GRAPH["looped.infer.forward"]  # at module level
    assert "looped.train.trainer" in GRAPH["looped.science.sweep"]  # inside a function


def test_no_function_is_too_long_to_read():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
