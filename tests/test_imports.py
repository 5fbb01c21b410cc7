"""The scanner package's modules import each other one way: no cycles, counting imports inside functions too.

Data flows shards -> read -> stages -> part files -> corpus steps -> tables -> report; a module that
imports one downstream of it (even lazily, inside a function) is how `finalize -> neighbours.run ->
pipeline -> finalize` crept in.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "scanner"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if n in modules and n != mod and not mod.startswith(n + "."):  # a package's own __init__ is fine
                    graph[mod].add(n)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_walk_sees_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "scanner.corpus.run" in graph and "scanner.corpus.neighbours" in graph["scanner.corpus.run"]  # lazy imports count


def test_no_import_cycles_among_scanner_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every scanner module `start` imports, directly or through others (lazy imports included)."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in graph.get(m, ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


SHARD_READERS = {"scanner.data.shards", "scanner.stages.read", "scanner.data.decode", "scanner.data.load"}


def test_the_report_reads_no_shard():
    """report.html is drawn from the scan's outputs alone (its previews/ included): no report module reaches a shard
    reader or a decoder, through scanner modules or tarfile / webdataset directly."""
    graph = import_graph()
    report = [m for m in graph if m == "scanner.report" or m.startswith("scanner.report.")]
    assert len(report) >= 5
    for m in report:
        assert not (reachable(graph, m) & SHARD_READERS), (m, reachable(graph, m) & SHARD_READERS)
        tree = ast.parse((PKG.parent / (m.replace(".", "/") + ".py")).read_text()
                         if not m.endswith("report") else (PKG / "report" / "__init__.py").read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not mods & {"tarfile", "webdataset"}, (m, mods)
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}  # the walk itself


def test_no_corpus_step_reads_a_shard_or_loads_a_model():
    """The corpus steps read part files only (issue #37): no module of scanner/corpus reaches a stage, a model, the
    embedder or a shard reader, directly or through another scanner module."""
    graph = import_graph()
    corpus = [m for m in graph if m.startswith("scanner.corpus")]
    assert len(corpus) >= 10
    banned = {"scanner.stages", "scanner.models", "scanner.neighbours.embed", "scanner.neighbours.train_embedder",
              "scanner.neighbours.replicate", "scanner.pipeline"} | SHARD_READERS
    for m in corpus:
        bad = {n for n in reachable(graph, m) | {m} if any(n == b or n.startswith(b + ".") for b in banned)}
        assert not bad, (m, bad)
