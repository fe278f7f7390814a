"""How the benchmarks report: a Markdown table, printed and written under benchmarks/results/."""

from __future__ import annotations

import pathlib
from typing import Any


def markdown(header: str, rows: list[dict[str, Any]], digits: int = 2) -> str:
    """``header``, then ``rows`` as a table: the union of their keys as columns, in order of first
    appearance, an empty cell where a row has no such key, floats to ``digits`` places."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = (row.get(column, "") for column in columns)
        lines.append("| " + " | ".join(f"{c:.{digits}f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def publish(table: str, path: pathlib.Path) -> None:
    """Print ``table`` and write it to ``path``."""
    print(table)
    path.parent.mkdir(exist_ok=True)
    path.write_text(table + "\n")
