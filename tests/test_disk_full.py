"""A full disk while a checkpoint is written: one clear error naming the folder, every rank stopped,
the last committed checkpoint intact and resumable.

A real 2-rank tiny pre-training through the CLI. The full disk is a fault injected into rank 0's
checkpoint writer (VITPIPE_FAULT=enospc:<step>:<rank>): it writes half a file and fails with
ENOSPC, as torch's writer does when the filesystem fills up under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train import checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"

pytestmark = pytest.mark.slow


def _ranks_of(job_path: Path) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(job_path) in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_full_disk_during_a_checkpoint_stops_every_rank_with_one_error_naming_the_folder(tmp_path):
    out = tmp_path / "pretrain"
    cmd = [sys.executable, "-m", "pipeline", "pretrain", str(TINY), "pretrain.steps=12", "pretrain.checkpoint_every=4",
           "pretrain.ranks=2", "pretrain.workers=0", "tracking.enabled=false", "--out", str(out),
           "--manifest", str(tmp_path / "prepare" / "manifest.json")]
    prep = subprocess.run([sys.executable, "-m", "pipeline", "prepare", str(TINY), "--out", str(tmp_path / "prepare")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    env = {**os.environ, "VITPIPE_FAULT": "enospc:8:0"}  # rank 0's disk fills up writing the step-8 checkpoint
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    folder = out / "checkpoints" / checkpoints.tag_for(8)
    errors = [line for line in done.stderr.splitlines() if line.startswith("vitpipe: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    msg = errors[0]
    assert "failed on rank 0" in msg and "CheckpointWriteError" in msg, msg
    assert f"{folder}: checkpoint of step 8 not written: No space left on device writing {folder}/" in msg, msg
    assert f"the last committed checkpoint {out / 'checkpoints' / checkpoints.tag_for(4)} is intact" in msg, msg

    # No rank (or loader worker) outlives the failure.
    deadline = time.time() + 10
    while time.time() < deadline and _ranks_of(out / "job.json"):
        time.sleep(0.1)
    assert not _ranks_of(out / "job.json")

    # The step-8 folder is half written and uncommitted; step 4 is committed and loads safely.
    assert [t for _, t, _ in checkpoints.committed(out / "checkpoints")] == [checkpoints.tag_for(4)]
    assert folder.is_dir() and not (folder / checkpoints.MARKER).exists()
    checkpoints.verify(out / "checkpoints", checkpoints.tag_for(4))
    assert not (out / "stage.json").exists() and not (out / "model.safetensors").exists()

    # With space again, the same command resumes from step 4 and finishes.
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step_00000004" in (out / "train.log").read_text()
    assert (out / "model.safetensors").is_file()
