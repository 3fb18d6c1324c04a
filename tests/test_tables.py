"""The one table renderer every report and benchmark prints with."""

from __future__ import annotations

from pipeline.tables import format_table, ratio


def test_numbers_right_text_left_and_per_column_formats():
    rows = [{"variant": "model", "batch": 1, "p50 ms": 1.3412, "vs eager": 1.781},
            {"variant": "model.int8_dynamic", "batch": 32, "p50 ms": 24.0691, "vs eager": 0.9}]
    lines = format_table(rows, {"p50 ms": ".3f", "vs eager": ratio}).splitlines()
    assert lines[0].split() == ["variant", "batch", "p50", "ms", "vs", "eager"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2] == "model                   1   1.341     1.78x"
    assert lines[3] == "model.int8_dynamic     32  24.069     0.90x"
    # every line is as wide as the rule: the ratio column stays right-aligned like a number's
    assert {len(line) for line in lines} == {len(lines[1])}


def test_missing_cells_and_empty_tables():
    lines = format_table([{"a": 1, "b": None}, {"a": 2.5}]).splitlines()
    assert lines[2].split() == ["1", "-"] and lines[3].split() == ["2.500"]
    assert format_table([]) == "(no rows)"
