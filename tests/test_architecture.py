"""The package's rooms, in the order the data goes through them (CONTRIBUTING.md, Architecture):

    plan  ->  estimate  ->  flow / trainer  ->  results  ->  report

(what runs, what it will cost, running it, what it measured, what it means), and the one way
imports go between them (`ALLOWED`: plan <- estimate, results <- trainer, report <- flow; the
flow and the trainer fill the results contract, so they import it). Planning, the estimator, the results contract, the flow and the report import no torch (they run in the
flow's processes and on a laptop before anything is spent); the trainer and the report never
import the flow; nothing imports the trainer but its entry points; and no module of `steps/`
imports itself back through others (an import circle), counting imports inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

STEPS = REPO / "steps"
ROOMS = ("plan", "estimate", "results", "flow", "trainer", "report")
# What each room may import of the others.
ALLOWED = {
    "plan": set(),
    "estimate": {"plan"},
    "results": {"plan"},
    "flow": {"plan", "estimate", "results", "report"},
    "trainer": {"plan", "estimate", "results"},
    "report": {"plan", "estimate", "results"},
}
# Entry points (`python -m steps.X`): thin modules that start one room. `python -m steps.plan`
# is the estimator's command line under the name users know.
ENTRY_POINTS = {"train.py": "trainer", "matrix.py": "plan", "bench.py": "trainer", "plan/__main__.py": "estimate"}


def _room(path: Path) -> str | None:
    rel = path.relative_to(STEPS)
    if rel.as_posix() in ENTRY_POINTS:
        return ENTRY_POINTS[rel.as_posix()]
    return rel.parts[0] if len(rel.parts) > 1 else None


def _module_name(path: Path, top: Path = REPO) -> str:
    parts = path.relative_to(top).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(path: Path) -> set[str]:
    """Every `steps.*` name the module imports, at the top or inside a function; for
    `from steps.x import y`, `steps.x.y` (a submodule, or a name of `steps.x`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "steps" or n.startswith("steps.")}


def _imported_rooms(path: Path) -> set[str]:
    return {name.split(".")[1] for name in _imported_names(path) if name.count(".") and name.split(".")[1] in ROOMS}


MODULES = sorted(p for p in STEPS.rglob("*.py") if _room(p) is not None)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_one_way(path):
    room = _room(path)
    wrong = _imported_rooms(path) - ALLOWED[room] - {room}
    assert not wrong, f"{path.relative_to(REPO)} ({room}) imports {sorted(wrong)}"


def test_every_module_is_in_a_room_or_is_an_entry_point():
    loose = sorted(p.name for p in STEPS.glob("*.py") if p.stem != "__init__" and p.name not in ENTRY_POINTS)
    assert loose == [] and sorted(p.name for p in STEPS.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ROOMS)


def import_graph(root: Path = STEPS) -> dict[str, set[str]]:
    """Module -> the modules of the package it names, at the top or inside a function: for
    `import a.b`, `a.b`; for `from a import b`, the submodule `a.b` where there is one, else `a`
    (whose `__init__` defines `b`). The packages Python initialises on the way are left out: a
    package's `__init__` that gathers its own submodules (as `steps.trainer.engines` does) is not
    a circle with each of them."""
    paths = {_module_name(p, root.parent): p for p in root.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths
                               else known(node.module) for a in node.names)
        graph[name] = targets - {None, name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: Tarjan's strongly connected components of more than one module,
    each as one circle through it (the shortest from its first module, sorted)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = []
    for component in found:
        start = min(component)
        paths, seen = [[start]], {start}
        while paths:  # breadth first, inside the component, back to the start
            path = paths.pop(0)
            nxt = [w for w in sorted(graph[path[-1]]) if w in component]
            if start in nxt:
                circles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return sorted(circles)


def test_no_module_imports_itself_back_through_others():
    circles = cycles(import_graph())
    assert circles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    """The finder itself, on a package made here: a -> b at the top, b -> a inside a function,
    c -> a alone (no circle); `from steps.room import b` names the submodule, not the package."""
    pkg = tmp_path / "steps"
    (pkg / "room").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "room" / "__init__.py").write_text("")
    (pkg / "room" / "a.py").write_text("from steps.room import b\n")
    (pkg / "room" / "b.py").write_text("def f():\n    from steps.room.a import x\n")
    (pkg / "room" / "c.py").write_text("import steps.room.a\n")
    graph = import_graph(pkg)
    assert (graph["steps.room.a"], graph["steps.room.c"]) == ({"steps.room.b"}, {"steps.room.a"})
    assert cycles(graph) == [["steps.room.a", "steps.room.b", "steps.room.a"]]


def test_the_rooms_allowed_imports_go_one_way():
    """The allowed imports between rooms are themselves free of circles."""
    assert cycles({room: set(allowed) for room, allowed in ALLOWED.items()}) == []


def test_planning_estimating_the_flow_and_the_report_import_no_torch():
    """Every module of these rooms imported in a fresh interpreter: torch is not among what
    was loaded; and what the flow's steps load (step bodies, cards, compute) brings no
    matplotlib and no pandas: only `join` reads tables and draws the report's figures (every
    other step, a cell's card included, starts in half the time)."""
    code = """
import importlib, pkgutil, sys
import steps.flow.tasks, steps.flow.cards, steps.flow.compute  # what every step of the flow loads
card_modules = {m.split(".")[0] for m in sys.modules}
import steps.plan, steps.estimate, steps.results, steps.flow, steps.report
for pkg in (steps.plan, steps.estimate, steps.results, steps.flow, steps.report):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft", "deepspeed"}))
print(sorted(card_modules & {"matplotlib", "pandas", "numpy"}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    heavy, card_heavy = out.stdout.split("\n")[:2]
    assert heavy == "[]"
    assert card_heavy == "[]"
