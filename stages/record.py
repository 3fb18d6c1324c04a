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
from pipeline.data.storage import is_url, read_url
from pipeline.folder_lock import LOCK_NAME

RECORD = "stage.json"
# What an interrupted training stage keeps for its resume: the checkpoints and the logs they continue.
RESUMABLE = {"checkpoints", "losses.jsonl", "metrics.jsonl", "train.log"}
# Beside a training stage's checkpoints: the fingerprint and settings they were written for.
SETTINGS_FILE = "settings.json"
LEGACY_FINGERPRINT = "fingerprint.txt"  # before settings.json: the fingerprint alone
# Inputs up to this size are identified by their sha256; larger ones by name, size and mtime.
HASHED_INPUT_BYTES = 64 * 1024 * 1024


class StageError(RuntimeError):
    """A stage that could not produce its outputs; the message says which input and why."""


def file_identity(path: str | Path) -> dict:
    """Identity of an input file by its content, never by where it is (a moved run folder keeps
    its fingerprints): its size and sha256; a file over 64 MiB, whose hashing on every rerun would
    cost seconds, by its name, size and mtime instead (all three survive a move).

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
    if st.st_size <= HASHED_INPUT_BYTES:
        return {"bytes": st.st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    return {"name": p.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(stage: str, config: dict, inputs: list[str | Path]) -> str:
    """Hash of what determines a stage's outputs."""
    blob = json.dumps({"stage": stage, "config": config, "inputs": [file_identity(i) for i in inputs]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _paths_absolute(value: Any) -> Any:
    """`value` with every relative path string that names an existing file made absolute."""
    if isinstance(value, dict):
        return {k: _paths_absolute(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_paths_absolute(v) for v in value]
    if isinstance(value, str) and "/" in value and not is_url(value) and not value.startswith("/") \
            and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _rebased(value: Any, old: str, new: str) -> Any:
    """`value` with every path string under the folder `old` moved under `new`."""
    if isinstance(value, dict):
        return {k: _rebased(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebased(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old):]
    return value


def _run_folder(out_dir: Path) -> str:
    """The folder holding a stage's folder (`vitpipe run`'s workdir), which moves as a whole."""
    return str(Path(out_dir).resolve().parent)


def completed(out_dir: Path, fp: str) -> dict | None:
    """The recorded result if `out_dir` holds a finished stage with fingerprint `fp`.

    Its outputs are recorded relative to `out_dir` and its result's paths under the run folder
    are rebased, so a run folder moved as a whole is still complete and names its new paths."""
    out_dir = Path(out_dir)
    path = out_dir / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if rec.get("fingerprint") != fp:
        return None
    if not all((out_dir / p).exists() for p in rec.get("outputs", [])):
        return None
    result = rec.get("result")
    old, new = rec.get("run_folder"), _run_folder(out_dir)
    return _rebased(result, old, new) if old and old != new else result


def settings(config: dict, inputs: list[str | Path]) -> dict:
    """What a stage's fingerprint covers, flat: ``{"train.lr": 0.001, ..., "input 1 (manifest.json)": {...}}``;
    kept beside a training stage's checkpoints so a changed setting can be named."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", json.loads(json.dumps(config, default=str)))
    for i, path in enumerate(inputs):
        flat[f"input {i + 1} ({Path(str(path)).name})"] = file_identity(path)
    return flat


# Settings a training stage's checkpoints can continue under when they change (cadence fields such
# as eval_every are execution settings, outside the fingerprint altogether). `steps` moves the
# schedule's end: see `continuable_change`.
CONTINUABLE = frozenset({"train.steps"})


def _changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def continuable_change(changes: dict[str, tuple[Any, Any]], newest_step: int) -> bool:
    """Whether a checkpoint at `newest_step` can continue under `changes`: only `train.steps`
    changed, to a value at or after that step. Continuing moves the schedule's end: the warmup and
    lr schedule are recomputed for the new `steps`, and the steps after the checkpoint follow
    the new curve (for cosine with more steps, a higher lr than the old run would have had there);
    the steps already taken are not replayed."""
    return bool(changes) and set(changes) <= CONTINUABLE and int(changes["train.steps"][1]) >= newest_step


def _shown(key: str, stage: str) -> str:
    """A setting as the user writes it: train.lr of the pretrain stage is pretrain.lr."""
    return f"{stage}.{key[len('train.'):]}" if key.startswith("train.") else key


def _committed(ckpt_root: Path) -> list[tuple[int, str, dict]]:
    from pipeline.train import checkpoints  # light module: no torch

    return checkpoints.committed(ckpt_root)


def begin(out_dir: Path, fp: str, resume: bool = True, stage_settings: dict | None = None,
          stage: str = "stage", keep: frozenset[str] = frozenset()) -> None:
    """Start (or restart) a stage: drop the old record and outputs first, so a crash never leaves
    something that looks complete.

    A training stage (one that passes `stage_settings`) keeps its committed checkpoints when they
    were written for the same settings, or for settings they can continue under (more steps), and
    says so; when other settings changed it refuses, naming each change and the two ways out,
    rather than throwing checkpoints away. With ``resume=False`` (``--force``) it deletes them,
    after saying how many and which. Nothing committed is ever deleted silently. Entries named in
    `keep` stay until the stage replaces them itself (prepare swaps in a complete new dataset)."""
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    found = _committed(ckpt_root) if stage_settings is not None else []
    keep_ckpt = False
    if found and resume:
        newest = found[-1][1]
        recorded = _recorded_settings(ckpt_root)
        if recorded is not None and recorded[0] == fp:
            keep_ckpt = True
        else:
            changes = _changes(recorded[1], stage_settings) if recorded and recorded[1] else None
            if changes is not None and continuable_change(changes, found[-1][0]):
                old, new = changes["train.steps"]
                print(f"[{stage}] continuing from {newest}: steps {old} -> {new}; the lr schedule now ends at "
                      f"step {new} and the steps after {found[-1][0]} follow it", flush=True)
                keep_ckpt = True
            else:
                listed = ("\n".join(f"  {_shown(k, stage)}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
                          if changes else "  (not recorded: the checkpoints predate settings.json)")
                steps_note = ""
                if changes and set(changes) <= CONTINUABLE:
                    steps_note = (f"\n({stage}.steps may grow, or shrink down to {found[-1][0]}, the newest "
                                  f"checkpoint's step, and training continues from it)")
                raise StageError(
                    f"{ckpt_root}: {len(found)} committed checkpoint(s), newest {newest}, were written with "
                    f"other settings, and training cannot continue from them under these changes:\n{listed}"
                    f"{steps_note}\nEither set the old values again to continue from {newest}, or rerun with "
                    f"--force to start over (that deletes these checkpoints).")
    elif found:
        print(f"[{stage}] --force: deleting {len(found)} committed checkpoint(s) in {ckpt_root} (newest "
              f"{found[-1][1]}); training starts over", flush=True)
    (out_dir / RECORD).unlink(missing_ok=True)
    if stage_settings is None:
        ckpt_fp = ckpt_root / LEGACY_FINGERPRINT
        keep_ckpt = resume and ckpt_fp.is_file() and ckpt_fp.read_text().strip() == fp
    if out_dir.exists():
        for child in out_dir.iterdir():
            if (keep_ckpt and child.name in RESUMABLE) or child.name in keep or child.name == LOCK_NAME:
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _recorded_settings(ckpt_root: Path) -> tuple[str, dict] | None:
    """(fingerprint, settings) the checkpoints were written for, or None if not recorded."""
    path = ckpt_root / SETTINGS_FILE
    try:
        rec = json.loads(path.read_text())
        return rec["fingerprint"], rec["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        legacy = ckpt_root / LEGACY_FINGERPRINT
        return (legacy.read_text().strip(), {}) if legacy.is_file() else None


def mark_checkpoints(out_dir: Path, fp: str, stage_settings: dict | None = None) -> Path:
    """Create the checkpoint folder of a training stage, tagged with the settings it is written for."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / SETTINGS_FILE, {"fingerprint": fp, "settings": stage_settings or {}})
    (root / LEGACY_FINGERPRINT).unlink(missing_ok=True)
    return root


def finish(out_dir: Path, stage: str, fp: str, outputs: list[str | Path], result: dict) -> None:
    """Mark a stage done: write stage.json atomically, last (outputs relative to `out_dir`)."""
    out_dir = Path(out_dir)
    rec = {"stage": stage, "fingerprint": fp, "outputs": [_relative_to(o, out_dir) for o in outputs],
           "run_folder": _run_folder(out_dir), "result": _paths_absolute(result)}
    write_json(out_dir / RECORD, rec)


def _relative_to(path: str | Path, folder: Path) -> str:
    try:
        return Path(path).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:  # an output outside the stage's folder (data.output) stays as given
        return str(Path(path).resolve())
