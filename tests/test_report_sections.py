"""The report's sections as data (`steps/report/sections.py`): each declared column is in the
table it comes from, the sections come in report order, and an empty one says what it needs.

A misspelt column name must fail here rather than vanish from the report.
"""

from __future__ import annotations

import pandas as pd
import pytest

from steps.report import analysis
from steps.report import build as report
from steps.report.render import KINDS, Block, markdown_table
from steps.report.sections import SECTIONS
from tests.test_report import ROWS, cell, ok

# The fixture of tests/test_report.py leaves three sections empty; these cells fill them: one
# configuration at two precisions, a cell of a preset model with its parameter counts, and one
# configuration at two LoRA ranks.
EXTRA = [
    cell("P1", "full", "single", "p4de.24xlarge", 1, mb=8, **ok(11017, 31.3, 1.20, 45, 39.7)),
    {**cell("P2", "full", "single", "p4de.24xlarge", 1, mb=8, **ok(12506, 20.1, 1.25, 40, 35.0)),
     "precision": "bf16-true"},
    {**cell("M", "lora", "ddp", "g5.12xlarge", 2, **ok(900, 1.5, 2.0, 30, 20)),
     "model": "llama-debug", "total_params": 100_000, "trainable_params": 4_000},
    {**cell("R8", "lora", "ddp", "p4d.24xlarge", 2, **ok(1000, 10.0, 1.3, 30, 20)), "train.lora.r": 8},
    {**cell("R64", "lora", "ddp", "p4d.24xlarge", 2, **ok(900, 12.0, 1.2, 32, 22)), "train.lora.r": 64},
]
TABLED = [s for s in SECTIONS if s.table is not None]
TITLES = ["Scaling", "Methods: memory and throughput", "Precision", "Settings", "Memory budget", "Planned vs measured",
          "Instance types: time and cost",
          "Learning rate", "Batch size", "Goodput and time to target", "Loss curves",
          "Cost, time and loss: the Pareto set"]


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return report.sections(analysis.prepare(pd.DataFrame(ROWS + EXTRA)))


def _markdown(rows: list[dict], out_dir) -> str:
    return report.write(pd.DataFrame(rows), out_dir, {"matrix": "fixture", "run_id": "r1"})["report"].read_text()


def _chunks(md: str) -> dict[str, str]:
    """Each `## ` heading's text up to the next one."""
    return {c.split("\n", 1)[0]: c.rstrip("\n") for c in md.split("\n## ")[1:]}


@pytest.mark.parametrize("section", TABLED, ids=lambda s: s.title)
def test_every_declared_column_is_in_the_sections_table(section, tables):
    table = tables[section.table]
    assert not table.empty, "the fixture must give every section rows, or its columns go unchecked"
    assert [c for c, _, _ in section.columns if c not in table.columns] == []
    assert {k for _, _, k in section.columns} <= set(KINDS)
    for extra in section.follow_ups:
        follow = tables[extra.table]
        assert not follow.empty
        assert [c for c, _, _ in extra.columns if c not in follow.columns] == []
        assert {k for _, _, k in extra.columns} <= set(KINDS)


def test_a_misspelt_column_is_an_error_not_a_missing_column():
    table = pd.DataFrame({"tokens_per_s": [1000.0]})
    with pytest.raises(KeyError, match="tokens_per_sec"):
        Block("table", table=table, columns=[("tokens_per_sec", "tokens/s", "num")])
    with pytest.raises(ValueError, match="percent"):
        Block("table", table=table, columns=[("tokens_per_s", "tokens/s", "percent")])
    # A derived table without rows has no columns either: its headers, no rows.
    empty = Block("table", table=pd.DataFrame(), columns=[("instance", "instance", "text"), ("ok", "ok", "int")])
    assert markdown_table(empty) == "| instance | ok |\n|---|---|"


def test_sections_come_in_report_order(tmp_path):
    assert [s.title for s in SECTIONS] == TITLES
    headings = [line[3:] for line in _markdown(ROWS, tmp_path).splitlines() if line.startswith("## ")]
    shown = [t for t in TITLES if t != "Settings"]  # nothing swept: the section is left out
    assert headings == ["Decision", "Key findings", "Results", "Cells that did not finish",
                        "Equivalent cells: how far apart they ended", *shown,
                        "How the numbers are defined", "Provenance"]


@pytest.mark.parametrize("rows", [ROWS, ROWS[:1]], ids=["fixture", "one cell"])
def test_an_empty_section_says_what_it_needs(rows, tmp_path):
    tables = report.sections(analysis.prepare(pd.DataFrame(rows)))
    assert any(tables[s.table].empty for s in TABLED), "no empty section to check"
    chunks = _chunks(_markdown(rows, tmp_path))
    for s in TABLED:
        if s.only_with_data:
            assert tables[s.table].empty and s.title not in chunks
            continue
        under_heading = chunks[s.title].split("\n\n")[2 if s.intro else 1]  # after the heading and intro
        if tables[s.table].empty:
            assert under_heading == f"_Not in this run: needs {s.needs}._"
        else:
            assert under_heading.startswith("| ")
