"""Checkpoint bookkeeping and the learning-rate schedule: pure functions, tested on real folders."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.train import checkpoints
from pipeline.train.schedule import lr_factor


def make(root, step, committed=True, world=2):
    d = root / checkpoints.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if committed:
        checkpoints.commit(root, d.name, step, world, 2, "run-1")
    return d


def test_only_committed_checkpoints_count(tmp_path):
    make(tmp_path, 4)
    make(tmp_path, 8, committed=False)  # a rank died while writing it
    (tmp_path / "step_00000012").mkdir()
    (tmp_path / "step_00000012" / checkpoints.MARKER).write_text('{"step": 1')  # a marker cut short
    step, tag, info = checkpoints.latest(tmp_path)
    assert (step, tag) == (4, "step_00000004")
    assert info["world_size"] == 2 and info["mlflow_run_id"] == "run-1"


def test_prune_keeps_the_newest_k_and_drops_torn_older_ones(tmp_path):
    for s in (2, 4, 6):
        make(tmp_path, s)
    make(tmp_path, 5, committed=False)
    make(tmp_path, 8, committed=False)  # newer than every committed one: may still be being written
    removed = checkpoints.prune(tmp_path, keep=2)
    assert sorted(removed) == ["step_00000002", "step_00000005"]
    assert [t for _, t, _ in checkpoints.committed(tmp_path)] == ["step_00000004", "step_00000006"]
    assert (tmp_path / "step_00000008").is_dir()


def test_universal_conversions_are_not_checkpoints_of_their_own(tmp_path):
    make(tmp_path, 4)
    uni = tmp_path / ("step_00000004" + checkpoints.UNIVERSAL_SUFFIX)
    uni.mkdir()
    (uni / checkpoints.MARKER).write_text(json.dumps({"converted_from": "step_00000004"}))
    assert [t for _, t, _ in checkpoints.committed(tmp_path)] == ["step_00000004"]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_decay(schedule):
    f = [lr_factor(s, total=100, warmup=10, schedule=schedule, min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    if schedule == "constant":
        assert all(x == 1.0 for x in f[10:])
        return
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # never increases after warmup
    mid = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * 0.5)) if schedule == "cosine" else 0.5)
    assert f[55] == pytest.approx(mid)
    assert lr_factor(100, total=100, warmup=10, schedule=schedule, min_ratio=0.1) == pytest.approx(0.1)
