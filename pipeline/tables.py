"""Plain-text tables for every report and benchmark: one renderer, so they all read alike."""

from __future__ import annotations

from typing import Any, Callable


def _cell(value: Any, spec: str | Callable[[Any], str] | None = None) -> str:
    if spec is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return spec(value) if callable(spec) else format(value, spec)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if value is None:
        return "-"
    return str(value)


def ratio(value: float) -> str:
    """A ratio against a baseline, as every benchmark prints it: ``1.78x``."""
    return f"{value:.2f}x"


def format_table(rows: list[dict], formats: dict[str, str | Callable[[Any], str]] | None = None) -> str:
    """A plain-text table (columns in first-seen key order); numbers right-aligned, text left-aligned.

    `formats`: a format spec per column (``{"val accuracy": ".4f"}``) where a report has always
    printed its figures to other precisions than the default (3 decimals; 1 from 1000 on), or a
    function of the number (`ratio`); either way the column stays a number's, right-aligned."""
    formats = formats or {}
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    cells = [[_cell(r.get(c, ""), formats.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    # a column is numeric when every row that has it holds a number (a blank cell is allowed)
    numeric = [all(isinstance(r[c], (int, float)) for r in rows if r.get(c, "") != "") for c in columns]

    def line(values: list[str]) -> str:
        parts = [v.rjust(wd) if num else v.ljust(wd) for v, wd, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    header = line(columns)
    rule = "  ".join("-" * wd for wd in widths)
    return "\n".join([header, rule, *(line(row) for row in cells)])
