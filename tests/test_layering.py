"""Package layering: each top-level folder imports only from itself or lower layers, and no modules import each other.

Lowest first: protocol <- broker <- workers <- gateway <- simulator <- benchmarks <- specmq (the CLI on top).
Every ``import`` in every module counts: module-level, inside functions and under ``if TYPE_CHECKING``; relative
imports are resolved against the importing module's package. tests/ and scripts/ are not checked.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("protocol", "broker", "workers", "gateway", "simulator", "benchmarks", "specmq")
RANK = {name: i for i, name in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    """Module name -> file, for every .py under the layered folders."""
    out = {}
    for top in LAYERS:
        folder = ROOT / top
        if folder.is_dir():
            for path in sorted(folder.rglob("*.py")):
                out[module_name(path)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in a module, relative ones resolved.

    ``from pkg import x`` names the submodule ``pkg.x`` when that is a module of ours, else ``pkg``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.append((sub if sub in known else module, node.lineno))
    return out


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = source_modules()
    known = set(modules)
    graph = {name: imports_of(name, path, known) for name, path in modules.items()}
    return modules, graph


def layering_violations() -> list[str]:
    modules, graph = import_graph()
    bad = []
    for name, edges in graph.items():
        mine = RANK[name.split(".")[0]]
        for target, line in sorted(set(edges), key=lambda e: e[1]):
            top = target.split(".")[0]
            if top in RANK and RANK[top] > mine:
                bad.append(f"{modules[name].relative_to(ROOT)}:{line}: {name} imports {target} "
                           f"({top} is above {name.split('.')[0]})")
    return bad


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module in the graph of our own modules (Tarjan)."""
    modules, graph = import_graph()
    edges = {n: sorted({t for t, _ in es if t in modules and t != n}) for n, es in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_reaches_a_higher_layer():
    bad = layering_violations()
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The walker itself: an import inside a function and a relative one are both found and resolved."""
    pkg = tmp_path / "broker"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from specmq.cli import main\n")
    (pkg / "b.py").write_text("from . import a\nfrom .a import f\n")
    (pkg / "c.py").write_text("from broker import b\n")
    (pkg / "d.py").write_text("import broker.c\nimport broker.a\n")
    (tmp_path / "protocol").mkdir()
    (tmp_path / "protocol" / "x.py").write_text("import broker.d\n")
    (pkg / "e.py").write_text("import broker.f\n")
    (pkg / "f.py").write_text("def g():\n    import broker.e\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    known = set(source_modules())
    assert ("specmq.cli", 2) in imports_of("broker.a", pkg / "a.py", known)
    assert imports_of("broker.b", pkg / "b.py", known) == [("broker.a", 1), ("broker.a", 2)]
    assert imports_of("broker.c", pkg / "c.py", known) == [("broker.b", 1)]
    bad = layering_violations()
    assert any(b.startswith("broker/a.py:2:") for b in bad) and any(b.startswith("protocol/x.py:1:") for b in bad)
    assert import_cycles() == [["broker.e", "broker.f"]]


def test_timed_waits_go_through_within():
    """``asyncio.wait_for`` loses a cancel that lands as its awaitable completes (Python < 3.12): a cancelled loop then
    runs on and whatever waits for it hangs (it hung a gateway's stop and a client's close). ``broker.waits.within``
    is the one timed wait."""
    offenders = [f"{path.relative_to(ROOT)}:{node.lineno}" for name, path in source_modules().items()
                 if name != "broker.waits"
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Attribute) and node.attr == "wait_for"
                 and isinstance(node.value, ast.Name) and node.value.id == "asyncio"]
    assert not offenders, f"use broker.waits.within instead of asyncio.wait_for at {', '.join(offenders)}"
