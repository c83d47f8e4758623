"""The layers of ARCHITECTURE.md, kept by reading every import of the package (AST).

Floors, bottom up: errors < config < store < engine < runs < tickets < search | tracking
< api < cli. A module imports only from its own floor or below; search and tracking
never import each other; ray/optuna only under search/, mlflow only under tracking/
(so the engine, the config, the store and the runs work where none is installed); no
import cycles, lazy (function-level) imports included, because a cycle hidden in a
function is still a cycle to a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lth_search"

FLOORS = {
    "lth_search": 0, "lth_search.errors": 0, "lth_search.portable": 0, "lth_search.config": 1, "lth_search.store": 2,
    "lth_search.engine": 3, "lth_search.runs": 4, "lth_search.tickets": 5, "lth_search.ticket_forms": 5, "lth_search.ticket_text": 5, "lth_search.compare": 5, "lth_search.search": 6,
    "lth_search.tracking": 6, "lth_search.api": 7, "lth_search.cli": 8,
}
ONLY_IN = {"ray": "lth_search.search", "optuna": "lth_search.search", "mlflow": "lth_search.tracking"}
APART = ("lth_search.search", "lth_search.tracking")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Every module `source` imports, anywhere in it (relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from lth_search.engine import lineage` imports the module lineage
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _unit(module: str) -> str:
    """The layer a module belongs to: its top-level subpackage or top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Rule breaks in {module: (source, is_package)}; an empty list when the layers hold."""
    known = set(sources)
    graph: dict[str, set[str]] = {}
    broken: list[str] = []
    for module, (source, is_package) in sorted(sources.items()):
        targets = imports_of(source, module, is_package)
        unit = _unit(module)
        for target in sorted(targets):
            top = target.split(".")[0]
            if top in ONLY_IN and _unit(module) != ONLY_IN[top]:
                broken.append(f"{module} imports {top} (only {ONLY_IN[top]} may)")
            if not target.startswith("lth_search") or target not in known:
                continue
            other = _unit(target)
            if {unit, other} == set(APART):
                broken.append(f"{module} imports {target}: search and tracking never import each other")
            elif FLOORS.get(other, 0) > FLOORS.get(unit, 0):
                broken.append(f"{module} imports {target}, a layer above it")
        graph[module] = {t for t in targets if t in known and t != module}
    broken += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return broken


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), as a readable path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def package_sources(root: Path = PACKAGE) -> dict[str, tuple[str, bool]]:
    return {
        module_name(path, root): (path.read_text(), path.name == "__init__.py")
        for path in sorted(root.rglob("*.py"))
    }


def test_the_package_keeps_its_layers() -> None:
    sources = package_sources()
    assert "lth_search.engine.lineage" in sources and "lth_search.search.driver" in sources
    assert violations(sources) == []


def test_the_rules_catch_each_kind_of_break() -> None:
    """The test of the test: each rule fails on a deliberate violation."""
    clean = {
        "lth_search": ("", True),
        "lth_search.engine": ("", True),
        "lth_search.engine.a": ("from lth_search.store.b import X\n", False),
        "lth_search.store": ("", True),
        "lth_search.store.b": ("import json\n", False),
        "lth_search.search": ("", True),
        "lth_search.search.driver": ("import ray\nfrom lth_search.engine.a import Y\n", False),
        "lth_search.tracking": ("", True),
        "lth_search.tracking.runs": ("import mlflow\n", False),
    }
    assert violations(clean) == []

    def broken(module: str, source: str) -> list[str]:
        return violations({**clean, module: (source, False)})

    assert broken("lth_search.engine.a", "def f():\n    import mlflow\n") == [
        "lth_search.engine.a imports mlflow (only lth_search.tracking may)"
    ]
    assert broken("lth_search.tracking.runs", "import optuna\n") == [
        "lth_search.tracking.runs imports optuna (only lth_search.search may)"
    ]
    assert broken("lth_search.search.driver", "from lth_search.tracking.runs import T\n") == [
        "lth_search.search.driver imports lth_search.tracking.runs: search and tracking never import each other"
    ]
    assert broken("lth_search.store.b", "from lth_search.engine.a import X\n")[0] == (
        "lth_search.store.b imports lth_search.engine.a, a layer above it"
    )
    cycle = violations({
        **clean,
        "lth_search.engine.a": ("from lth_search.engine.c import Z\n", False),
        "lth_search.engine.c": ("def f():\n    from . import a\n", False),
    })
    assert cycle == ["import cycle: lth_search.engine.a -> lth_search.engine.c -> lth_search.engine.a"]
