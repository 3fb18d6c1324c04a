"""`vitpipe bench tracking` end to end, small: a real loopback `mlflow server`, every metric of the
`on` candidate delivered, and the CPU accounting that says where tracking's cost goes (the sender
thread's delivery time, the server's CPU) measured rather than guessed."""

from __future__ import annotations

import pytest

from tools.bench_tracking import bench_tracking, bench_tracking_table

pytestmark = pytest.mark.slow


def test_bench_reports_step_times_and_where_the_cpu_went():
    result = bench_tracking(rounds=2, steps=40, width=64, batch=16, server_nice=19)
    assert set(result["best_round"]) == set(result["all_steps"]) == {"off", "off_again", "on", "outage"}
    assert result["best_round"]["off"]["p99_vs_off"] == result["all_steps"]["off"]["p99_vs_off"] == 1.0
    # each candidate's percentiles over all its steps lie within the spread of its rounds
    for name, row in result["all_steps"].items():
        rounds = result["all_rounds"][name]
        assert len(rounds) == 2
        assert min(r["p50_ms"] for r in rounds) <= row["p50_ms"] <= max(r["p50_ms"] for r in rounds)
    assert result["undelivered_on"] == 0  # every (metric, step) of `on` reached the server
    assert result["queued_in_outage"] == 2 * 40  # the outage kept every call for the server's return
    assert result["server_nice"] == 19
    # 80 steps x 7 metrics were delivered: the sender thread spent real CPU on it, and so did the server
    assert 0 < result["sender_cpu_s_on"] < 30 and result["server_cpu_s"] > 0
    table = bench_tracking_table(result)
    assert "sender thread CPU" in table and "(nice 19)" in table and "noise floor" in table
