"""The package's rooms and the one way imports go between them (README, Architecture):

    plan  ->  results  ->  flow / trainer / report

planning, the results contract, the flow and the report import no torch (they run in the
flow's processes and on a laptop before anything is spent); the trainer and the report never
import the flow; nothing imports the trainer but its entry points.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

STEPS = REPO / "steps"
ROOMS = ("plan", "results", "flow", "trainer", "report")
# What each room may import of the others.
ALLOWED = {
    "plan": set(),
    "results": {"plan"},
    "flow": {"plan", "results", "report"},
    "trainer": {"plan", "results"},
    "report": {"plan", "results"},
}
# Entry points (`python -m steps.X`): thin modules that start one room.
ENTRY_POINTS = {"train": "trainer", "matrix": "plan", "bench": "trainer"}


def _room(path: Path) -> str | None:
    rel = path.relative_to(STEPS).parts
    return rel[0] if len(rel) > 1 else ENTRY_POINTS.get(path.stem)


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "steps" and len(parts) > 1 and parts[1] in ROOMS:
                rooms.add(parts[1])
    return rooms


MODULES = sorted(p for p in STEPS.rglob("*.py") if _room(p) is not None)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_one_way(path):
    room = _room(path)
    wrong = _imported_rooms(path) - ALLOWED[room] - {room}
    assert not wrong, f"{path.relative_to(REPO)} ({room}) imports {sorted(wrong)}"


def test_every_module_is_in_a_room_or_is_an_entry_point():
    loose = sorted(p.name for p in STEPS.glob("*.py") if p.stem not in ("__init__", *ENTRY_POINTS))
    assert loose == [] and sorted(p.name for p in STEPS.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ROOMS)


def test_planning_the_flow_and_the_report_import_no_torch():
    """Every module of these rooms imported in a fresh interpreter: torch is not among what
    was loaded; and what the flow's steps load (step bodies, cards, compute) brings no
    matplotlib: only `join` draws the report's figures."""
    code = """
import importlib, pkgutil, sys
import steps.flow.tasks, steps.flow.cards, steps.flow.compute  # what every step of the flow loads
card_modules = set(sys.modules)
import steps.flow, steps.report
for pkg in (steps.plan, steps.results, steps.flow, steps.report):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft", "deepspeed"}))
print("matplotlib" in card_modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    heavy, card_plots = out.stdout.split("\n")[:2]
    assert heavy == "[]"
    assert card_plots == "False"
