"""`vitpipe bench tracking` end to end, small: a real loopback `mlflow server`, every metric of the
`on` candidate delivered, and the CPU accounting that says where tracking's cost goes (the sender
thread's delivery time, the server's CPU) measured rather than guessed."""

from __future__ import annotations

import os
import threading

import pytest

from tools.bench_tracking import (_percentile, _place_threads, _restore_threads, bench_tracking, bench_tracking_table,
                                  noise_floor, split_cores)

pytestmark = pytest.mark.slow


def test_bench_reports_step_times_and_where_the_cpu_went():
    cores_before = os.sched_getaffinity(0)
    result = bench_tracking(rounds=2, steps=40, width=64, batch=16, server_nice=19)
    assert os.sched_getaffinity(0) == cores_before  # the loop's pinning is undone: this process goes on
    assert set(result["best_round"]) == set(result["all_steps"]) == {"off", "off_again", "on", "outage"}
    assert result["best_round"]["off"]["p99_vs_off"] == result["all_steps"]["off"]["p99_vs_off"] == 1.0
    # each candidate's percentiles over all its steps lie within the spread of its rounds
    for name, row in result["all_steps"].items():
        rounds = result["all_rounds"][name]
        assert len(rounds) == 2
        assert min(r["p50_ms"] for r in rounds) <= row["p50_ms"] <= max(r["p50_ms"] for r in rounds)
    assert result["undelivered_on"] == 0  # every (metric, step) of `on` reached the server
    # the outage kept every call for the server's return: 2 rounds x 40 steps, and the step-0 call that
    # started its sender thread
    assert result["queued_in_outage"] == 2 * 40 + 1
    assert result["server_nice"] == 19
    # 80 steps x 7 metrics were delivered: the sender thread spent real CPU on it, and so did the server
    assert 0 < result["sender_cpu_s_on"] < 30 and result["server_cpu_s"] > 0
    floor = result["noise_floor"]
    assert floor["p99"] == max(floor["off_again_vs_off"], floor["off_halves"], floor["off_again_halves"])
    table = bench_tracking_table(result)
    assert f"p99 {floor['p99']:.1%} apart" in table
    assert "sender thread CPU" in table and "(nice 19)" in table and "noise floor" in table
    if len(cores_before) >= 2:  # --pin split (the default): the loop alone on one core
        loop, rest = result["cores"]["loop"], result["cores"]["server_and_senders"]
        assert len(loop) == 1 and loop[0] not in rest and set(loop + rest) == cores_before
        assert f"loop on {loop}" in table


def test_pinning_puts_the_loop_alone_and_restores_every_thread():
    """`_place_threads` pins the caller to the loop's core and other threads (a sender) to the rest, by
    native thread id, and `_restore_threads` gives each its cores back."""
    placement = split_cores("split")
    if placement is None:
        pytest.skip("one core: nothing to split")
    loop, rest = placement
    started, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), release.wait(30)), daemon=True)
    worker.start()
    started.wait(10)
    before_me, before_worker = os.sched_getaffinity(0), os.sched_getaffinity(worker.native_id)
    saved: dict[int, set[int]] = {}
    try:
        _place_threads(loop, rest, saved)
        assert os.sched_getaffinity(0) == loop and os.sched_getaffinity(worker.native_id) == rest
        _place_threads(loop, rest, saved)  # a second pinning keeps the first saved affinities
    finally:
        _restore_threads(saved)
        release.set()
    assert os.sched_getaffinity(0) == before_me and os.sched_getaffinity(worker.native_id) == before_worker
    assert split_cores("none") is None
    with pytest.raises(ValueError, match="--pin must be"):
        split_cores("half")


def test_noise_floor_is_the_widest_of_three_same_loop_pairs():
    # off: its even rounds (0, 2) end in 10 ms steps, its odd rounds (1, 3) in 12 ms: the halves
    # differ by 1/6 while off and off_again pooled agree (one pair alone would read 0 %)
    steps = 100
    off = [t for r in range(4) for t in [1.0] * 98 + [10.0 if r % 2 == 0 else 12.0] * 2]
    off_again = list(off)
    floor = noise_floor(off, off_again, steps)
    assert floor["off_again_vs_off"] == 0.0
    assert floor["off_halves"] == pytest.approx(1 / 6) and floor["off_again_halves"] == pytest.approx(1 / 6)
    assert floor["p99"] == pytest.approx(1 / 6)
    # one round: no halves to compare, the pair alone
    a, b = [1.0] * 99 + [2.0], [1.0] * 99 + [3.0]
    one = noise_floor(a, b, 100)
    assert one["off_halves"] is None and one["p99"] == pytest.approx(abs(_percentile(b, 99) / _percentile(a, 99) - 1))
