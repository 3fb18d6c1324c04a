"""Plain-text tables for every report and benchmark: one renderer, so they all read alike."""

from __future__ import annotations

from typing import Any


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if value is None:
        return "-"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """A plain-text table (columns in first-seen key order); numbers right-aligned, text left-aligned."""
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]

    def line(values: list[str]) -> str:
        parts = [v.rjust(wd) if num else v.ljust(wd) for v, wd, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    header = line(columns)
    rule = "  ".join("-" * wd for wd in widths)
    return "\n".join([header, rule, *(line(row) for row in cells)])
