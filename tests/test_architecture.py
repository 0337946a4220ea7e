"""The package layout as README's architecture section states it: no package imports another
that imports it back (directly or round a loop), the ledger core imports nothing but crypto,
and only the composition root (`node`, and the `cli` that starts it) imports `node`."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "medledger"


def package_imports() -> dict[str, set[str]]:
    """For each package (or top-level module) of medledger, the others it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE).parts
        source = parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                dotted = name.split(".")
                if dotted[0] == "medledger" and len(dotted) > 1 and dotted[1] != source:
                    graph[source].add(dotted[1])
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_package_imports_its_way_back_to_itself() -> None:
    assert cycles(package_imports()) == []


def test_the_cycle_finder_finds_a_loop() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_the_ledger_core_depends_on_crypto_only() -> None:
    assert package_imports()["ledger"] <= {"crypto"}


def test_only_the_composition_root_imports_node() -> None:
    importers = {source for source, targets in package_imports().items() if "node" in targets}
    assert importers <= {"cli"}
