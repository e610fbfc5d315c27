"""The report's blocks and their three renderings: Markdown, one self-contained HTML page and
Metaflow card components.

Kept light: the flow's per-cell card (`steps/flow/cards.py`) imports `fmt` from here, so
nothing that draws (matplotlib) is imported, and `markdown` and `metaflow.cards` only inside
the functions that need them.
"""

from __future__ import annotations

import base64
import html
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# How `fmt` writes a value: text as it is, int with thousands separators, num to 4
# significant digits, pct as a percentage, usd as dollars, x as a ratio (2.40x), lr as a
# learning rate (0.0002), s as seconds to a tenth.
KINDS = ("text", "int", "num", "pct", "usd", "x", "lr", "s")
Cols = list[tuple[str, str, str]]  # (column, header, kind) for each column a table shows
# outcomes that stand out in the HTML page
FAILED_OUTCOMES = ("oom", "diverged", "hang", "timeout", "stopped", "error", "skipped")


@dataclass
class Block:
    """Markdown text, a table or a figure. A table keeps only the columns it shows (blocks
    travel as a Metaflow artifact); a column it does not have is an error, not a column quietly
    left out of the report. A table without rows may lack them all (a derived table with no
    rows has no columns either): it shows its headers only."""

    kind: str  # "text" (Markdown), "table", "image"
    text: str = ""
    table: pd.DataFrame | None = None
    columns: Cols = field(default_factory=list)
    image: Path | None = None

    def __post_init__(self):
        if self.table is None:
            return
        names = [c for c, _, _ in self.columns]
        missing = [c for c in names if c not in self.table.columns]
        if missing and not self.table.empty:
            raise KeyError(f"the table has no column {', '.join(missing)}")
        unknown = sorted({k for _, _, k in self.columns} - set(KINDS))
        if unknown:
            raise ValueError(f"unknown column kind {', '.join(unknown)}; one of {', '.join(KINDS)}")
        self.table = self.table.reindex(columns=names)


def fmt(value: Any, kind: str = "num") -> str:
    """One cell of a table: '-' for missing, numbers to 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or _is_pandas_na(value):
        return "-"
    if kind == "text" or isinstance(value, str) or isinstance(value, bool):
        return str(value)
    value = float(value)
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "usd":
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "lr":
        return f"{value:g}"
    if kind == "s":
        return f"{value:,.1f}"
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _is_pandas_na(value: Any) -> bool:
    """pandas' NA, without importing pandas where no table was read (a cell's card)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and value is pandas.NA


def _rows(block: Block) -> tuple[list[str], list[list[str]]]:
    return ([h for _, h, _ in block.columns],
            [[fmt(r[c], k) for c, _, k in block.columns] for _, r in block.table.iterrows()])


def markdown_table(block: Block) -> str:
    headers, rows = _rows(block)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(block: Block) -> str:
    """Text left, numbers right; an outcome other than ok stands out."""
    headers, rows = _rows(block)
    kinds = [k for _, _, k in block.columns]

    def td(text: str, kind: str) -> str:
        cls = "t" if kind == "text" else "n"
        if kind == "text" and text in FAILED_OUTCOMES:
            cls += " bad"
        return f'<td class="{cls}">{html.escape(text)}</td>'

    head = "".join(f'<th class="{"t" if k == "text" else "n"}">{html.escape(h)}</th>' for h, k in zip(headers, kinds))
    body = "".join("<tr>" + "".join(td(c, k) for c, k in zip(r, kinds)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    """report.md: figures linked relative to out_dir, where they were written."""
    parts = []
    for b in blocks:
        if b.kind == "text":
            parts.append(b.text)
        elif b.kind == "table":
            parts.append(markdown_table(b))
        else:
            parts.append(f"![{b.text}]({b.image.relative_to(out_dir).as_posix()})")
    return "\n\n".join(parts) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 7px;white-space:nowrap}
th{background:#f0f0f0}.n{text-align:right}.t{text-align:left}.bad{background:#fde2e2;color:#a00}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}code{background:#f4f4f4;padding:0 3px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.6em}"""


def to_html(blocks: list[Block], title: str) -> str:
    """One file: figures as data: URIs, styles inline, no script, nothing fetched."""
    import markdown

    body = []
    for b in blocks:
        if b.kind == "text":
            body.append(markdown.markdown(b.text))
        elif b.kind == "table":
            body.append(html_table(b))
        else:
            data = base64.b64encode(b.image.read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}"></figure>')
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def card_components(blocks: list[Block]) -> list:
    """The same report as Metaflow card components (for the `end` step's card)."""
    from metaflow.cards import Image, Markdown, Table

    out = []
    for b in blocks:
        if b.kind == "text":
            out.append(Markdown(b.text))
        elif b.kind == "table":
            headers, rows = _rows(b)
            out.append(Table(rows, headers=headers))
        else:
            out.append(Image(b.image.read_bytes(), label=b.text))
    return out
