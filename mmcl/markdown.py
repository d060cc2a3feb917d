"""Markdown tables for the reports mmcl writes (bench perf and fidelity, evaluation reports,
sweep trials): one helper, so every table has the same layout."""

from __future__ import annotations

from typing import Sequence

# A column's alignment: one letter per column in `align`, left when the letter is missing.
ALIGN_MARKS = {"l": "---", "r": "---:", "c": ":---:"}


def table_lines(header: Sequence[str], rows: Sequence[Sequence], align: str = "") -> list[str]:
    """A markdown table as lines: the header, the alignment row (`align`: "l", "r" or "c" per
    column, e.g. "lrr"; missing letters are "l") and one line per row (each cell is `str`'d)."""
    marks = [ALIGN_MARKS[align[i] if i < len(align) else "l"] for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def table(header: Sequence[str], rows: Sequence[Sequence], align: str = "") -> str:
    """`table_lines` joined into one string (no trailing newline)."""
    return "\n".join(table_lines(header, rows, align))
