"""No import cycles in the package, and hf_safe_exit.risk never imports hf_safe_exit.cards.

The graph is read from the source (every ``import`` statement, also those inside functions, which run later
but still make the modules depend on each other). An import of a module's own ancestor package (e.g. ``from ..
import __version__``) is no edge: Python initialises every ancestor before the module itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_safe_exit"


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if "default_model" in parts:  # the shipped model's custom_generate/ code is not part of the package
            continue
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, (path, is_package) in modules.items():
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target)
                if found and found != module and not module.startswith(found + "."):
                    edges[module].add(found)
    return edges


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [m for m in edges if m == start or m.startswith(start + ".")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges[m])
    return seen


def test_the_graph_sees_imports():
    edges = _graph()
    assert "hf_safe_exit.risk.store" in edges["hf_safe_exit.cards.files"]  # a relative import inside a package
    assert "hf_safe_exit.cards" in edges["hf_safe_exit.demo.run"]  # a function-level import
    assert "hf_safe_exit.risk.loss_table" in edges["hf_safe_exit.risk.store"]


def test_risk_never_imports_cards():
    reached = _reachable(_graph(), "hf_safe_exit.risk")
    assert not {m for m in reached if m == "hf_safe_exit.cards" or m.startswith("hf_safe_exit.cards.")}


def test_no_import_cycles():
    edges = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert cycles == []
