"""Render a table with ``rich`` when it is installed, else as plain aligned text."""
from __future__ import annotations

import re
import sys
from typing import Any, Sequence, TextIO

from distopt.bench import optional


def plain_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(c) for c in columns]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    right = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(columns))]
    lines = [title] if title else []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None,
    file: TextIO | None = None, plain: bool = False,
) -> None:
    """Print the table to ``file`` (stdout by default)."""
    file = file if file is not None else sys.stdout
    rich_table, rich_console = optional("rich.table"), optional("rich.console")
    if plain or rich_table is None or rich_console is None:
        print(plain_table(columns, rows, title), file=file)
        return
    table = rich_table.Table(title=title)
    for i, name in enumerate(columns):
        numeric = bool(rows) and all(_is_number(row[i]) for row in rows)
        table.add_column(name, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    width = None if getattr(file, "isatty", lambda: False)() else 200
    rich_console.Console(file=file, width=width, highlight=False).print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _is_number(value: Any) -> bool:
    """Numbers, and strings that read as one ("0.97x", "> 46", "-"), are right-aligned."""
    if isinstance(value, str):
        return value == "-" or re.match(r"^[-+>~]?\s*\d", value) is not None
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
