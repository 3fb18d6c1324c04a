"""Checkpoint bookkeeping and the learning-rate schedule: pure functions, tested on real folders."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

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


def test_prune_keeps_the_newest_k_and_drops_torn_older_ones(tmp_path, capsys):
    for s in (2, 4, 6):
        make(tmp_path, s)
    make(tmp_path, 5, committed=False)
    make(tmp_path, 8, committed=False)  # newer than every committed one: may still be being written
    removed = checkpoints.prune(tmp_path, keep=2)
    assert sorted(removed) == ["step_00000002", "step_00000005"]
    assert [t for _, t, _ in checkpoints.committed(tmp_path)] == ["step_00000004", "step_00000006"]
    assert (tmp_path / "step_00000008").is_dir()
    said = capsys.readouterr().out
    assert f"deleting {tmp_path / 'step_00000002'}: keep_checkpoints=2" in said and "step_00000005" not in said


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


# --------------------------------------------------------------------------- checkpoint safety


class Payload:
    """What a planted checkpoint carries: unpickling it runs code (here: it creates a file)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('payload ran')",))


def real_checkpoint(root: Path, step: int, payload=None) -> Path:
    """A checkpoint folder holding what DeepSpeed and vitpipe store (tensors, numpy RNG state,
    DeepSpeed's loss scaler and ZeRO enum), committed, or planted with `payload` inside."""
    import numpy as np
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    d = root / checkpoints.tag_for(step)
    d.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}, "rng": np.random.get_state(), "loss_scaler": LossScaler(1.0),
                "zero_stage": ZeroStageEnum.gradients, "client": payload}, d / "mp_rank_00_model_states.pt")
    checkpoints.commit(root, d.name, step, 1, 2)
    return d


def test_committed_checkpoint_verifies(tmp_path):
    d = real_checkpoint(tmp_path, 4)
    marker = json.loads((d / checkpoints.MARKER).read_text())
    assert marker["files"] == {"mp_rank_00_model_states.pt":
                               hashlib.sha256((d / "mp_rank_00_model_states.pt").read_bytes()).hexdigest()}
    checkpoints.verify(tmp_path, d.name)


def test_planted_checkpoint_is_refused_by_name_and_its_payload_never_runs(tmp_path):
    target = tmp_path / "pwned"
    # an attacker who writes a marker with the right digests: the weights-only unpickler refuses it
    d = real_checkpoint(tmp_path / "ckpt", 99, payload=Payload(target))
    with pytest.raises(checkpoints.UnsafeCheckpoint, match=r"step_00000099/mp_rank_00_model_states.pt: holds "
                       r"objects a training checkpoint never holds \(the global exec\)"):
        checkpoints.verify(tmp_path / "ckpt", d.name)
    assert not target.exists()
    # a marker without digests (not ours), a changed file, an added file: refused before any unpickling
    marker = d / checkpoints.MARKER
    marker.write_text(json.dumps({"step": 99, "world_size": 1, "zero_stage": 2}))
    with pytest.raises(checkpoints.UnsafeCheckpoint, match="records no file digests"):
        checkpoints.verify(tmp_path / "ckpt", d.name)
    good = real_checkpoint(tmp_path / "ckpt", 100)
    (good / "extra.pt").write_bytes(b"x")
    with pytest.raises(checkpoints.UnsafeCheckpoint, match="extra.pt: not part of the committed checkpoint"):
        checkpoints.verify(tmp_path / "ckpt", good.name)
    (good / "extra.pt").unlink()
    data = bytearray((good / "mp_rank_00_model_states.pt").read_bytes())
    data[-5] ^= 1
    (good / "mp_rank_00_model_states.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoints.UnsafeCheckpoint, match="mp_rank_00_model_states.pt: sha256 differs"):
        checkpoints.verify(tmp_path / "ckpt", good.name)
    assert not target.exists()


def test_planted_universal_conversion_is_refused(tmp_path):
    target = tmp_path / "pwned"
    real_checkpoint(tmp_path, 8)
    uni = real_checkpoint(tmp_path, 8 * 1000, payload=Payload(target))  # then renamed as a conversion of step 8
    uni = uni.rename(tmp_path / ("step_00000008" + checkpoints.UNIVERSAL_SUFFIX))
    with pytest.raises(checkpoints.UnsafeCheckpoint, match="_universal/mp_rank_00_model_states.pt: holds objects"):
        checkpoints.to_universal(tmp_path, "step_00000008")
    assert not target.exists()
