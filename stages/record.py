"""What a finished stage leaves behind: ``stage.json``, written last, so a rerun can be skipped.

A stage folder without ``stage.json`` never counts as done, whatever else is in it; a stage whose
recorded fingerprint (its config slice and the identity of its input files) still matches is skipped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json
from pipeline.data.manifest import is_url, read_url

RECORD = "stage.json"
# What an interrupted training stage keeps for its resume: the checkpoints and the logs they continue.
RESUMABLE = {"checkpoints", "losses.jsonl", "train.log"}


class StageError(RuntimeError):
    """A stage that could not produce its outputs; the message says which input and why."""


def file_identity(path: str | Path) -> dict:
    """Cheap identity of an input file: its path, size and, for small files, sha256.

    An s3:// or http(s):// URL (a manifest in object storage) is identified by its URL and the
    sha256 of its bytes, fetched once; a manifest records every shard's sha256, so this identifies
    the whole dataset.
    """
    if is_url(path):
        data = read_url(str(path), what="input")
        return {"url": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    p = Path(path)
    if not p.exists():
        raise StageError(f"{p}: input file not found")
    st = p.stat()
    ident: dict[str, Any] = {"path": str(p.resolve()), "bytes": st.st_size}
    if st.st_size <= 64 * 1024 * 1024:
        ident["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    else:
        ident["mtime_ns"] = st.st_mtime_ns
    return ident


def fingerprint(stage: str, config: dict, inputs: list[str | Path]) -> str:
    """Hash of what determines a stage's outputs."""
    blob = json.dumps({"stage": stage, "config": config, "inputs": [file_identity(i) for i in inputs]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def completed(out_dir: Path, fp: str) -> dict | None:
    """The recorded result if `out_dir` holds a finished stage with fingerprint `fp`."""
    path = Path(out_dir) / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if rec.get("fingerprint") != fp:
        return None
    if not all(Path(p).exists() for p in rec.get("outputs", [])):
        return None
    return rec.get("result")


def begin(out_dir: Path, fp: str, resume: bool = True) -> None:
    """Start (or restart) a stage: drop the old record and outputs first, so a crash never leaves
    something that looks complete. Training checkpoints survive only if they were written for the
    same fingerprint (same config and inputs), so an interrupted stage resumes instead of restarting."""
    out_dir = Path(out_dir)
    (out_dir / RECORD).unlink(missing_ok=True)
    ckpt_fp = out_dir / "checkpoints" / "fingerprint.txt"
    keep_ckpt = resume and ckpt_fp.is_file() and ckpt_fp.read_text().strip() == fp
    if out_dir.exists():
        for child in out_dir.iterdir():
            if keep_ckpt and child.name in RESUMABLE:
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def mark_checkpoints(out_dir: Path, fp: str) -> Path:
    """Create the checkpoint folder of a training stage, tagged with the stage's fingerprint."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    (root / "fingerprint.txt").write_text(fp)
    return root


def finish(out_dir: Path, stage: str, fp: str, outputs: list[str | Path], result: dict) -> None:
    """Mark a stage done: write stage.json atomically, last."""
    rec = {"stage": stage, "fingerprint": fp, "outputs": [str(o) for o in outputs], "result": result}
    write_json(Path(out_dir) / RECORD, rec)
