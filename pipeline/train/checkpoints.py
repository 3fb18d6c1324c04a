"""Resumable training checkpoints: DeepSpeed state per tag, a commit marker written last, pruning.

Contract (see also docs/checkpoints.md):
* a checkpoint is the folder ``checkpoints/step_NNNNNNNN`` written by every rank through DeepSpeed;
* it counts only once ``COMMITTED`` exists in it: rank 0 writes that marker after a barrier that
  every rank reaches only when its own files are written, so a rank killed mid-save leaves a
  folder without the marker, which resume never picks and the next save prunes;
* resume order: this stage's run folder (newest committed) > nothing (start from init/scratch);
* the last `keep` committed checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.launch.lifetime import launcher_alive

MARKER = "COMMITTED"
PREFIX = "step_"
UNIVERSAL_SUFFIX = "_universal"


def tag_for(step: int) -> str:
    """The folder name of the checkpoint written after optimizer step `step`."""
    return f"{PREFIX}{step:08d}"


def committed(root: Path) -> list[tuple[int, str, dict]]:
    """(step, tag, marker contents) of every committed checkpoint under `root`, oldest first."""
    out = []
    if not root.is_dir():
        return out
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and not d.name.endswith(UNIVERSAL_SUFFIX) and (d / MARKER).is_file():
            try:
                info = json.loads((d / MARKER).read_text())
            except json.JSONDecodeError:
                continue  # a marker cut short cannot have been written by a finished commit
            out.append((int(info["step"]), d.name, info))
    return sorted(out)


def latest(root: Path) -> tuple[int, str, dict] | None:
    """The newest committed checkpoint, or None."""
    found = committed(root)
    return found[-1] if found else None


def commit(root: Path, tag: str, step: int, world_size: int, zero_stage: int, mlflow_run_id: str | None = None) -> None:
    """Mark `tag` complete (rank 0, after every rank finished writing); never once the launcher is gone."""
    if not launcher_alive():
        raise RuntimeError(f"{root / tag}: not committed: the process that launched this rank is gone "
                           "(the job was killed)")
    info = {"step": step, "world_size": world_size, "zero_stage": zero_stage, "time": time.time(),
            "mlflow_run_id": mlflow_run_id}
    write_json(root / tag / MARKER, info, indent=None)


def prune(root: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` committed checkpoints, and uncommitted ones older than the newest."""
    done = committed(root)
    keep_tags = {tag for _, tag, _ in done[-keep:]}
    newest = done[-1][0] if done else -1
    removed = []
    for d in root.iterdir() if root.is_dir() else []:
        if not (d.is_dir() and d.name.startswith(PREFIX)) or d.name in keep_tags:
            continue
        step = int(d.name[len(PREFIX):]) if d.name[len(PREFIX):].isdigit() else -1
        if (d / MARKER).is_file() or step < newest:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def to_universal(root: Path, tag: str) -> str:
    """Convert `tag` with DeepSpeed's ds_to_universal (once) so another number of ranks can load it."""
    import subprocess
    import sys

    out = f"{tag}{UNIVERSAL_SUFFIX}"
    if (root / out / MARKER).is_file():
        return out
    shutil.rmtree(root / out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(root / tag), "--output_folder", str(root / out), "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{root / tag}: conversion to a universal checkpoint failed:\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    (root / out / MARKER).write_text(json.dumps({"converted_from": tag}))
    return out
