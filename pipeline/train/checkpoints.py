"""Resumable training checkpoints: DeepSpeed state per tag, a commit marker written last, pruning.

Contract (see also docs/checkpoints.md):
* a checkpoint is the folder ``checkpoints/step_NNNNNNNN`` written by every rank through DeepSpeed;
* it counts only once ``COMMITTED`` exists in it: rank 0 writes that marker after a barrier that
  every rank reaches only when its own files are written, so a rank killed mid-save leaves a
  folder without the marker, which resume never picks and the next save prunes;
* resume order: this stage's run folder (newest committed) > nothing (start from init/scratch);
* the last `keep` committed checkpoints are kept;
* the marker records every file's sha256, and nothing of a checkpoint is unpickled before
  `verify` has checked those digests and read every ``.pt`` file with torch's weights-only
  unpickler, which admits tensors, containers and the few DeepSpeed/numpy types in
  `safe_globals()` and refuses anything else (DeepSpeed itself loads with weights_only=False,
  so a planted checkpoint would otherwise run its payload).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.launch.lifetime import launcher_alive

MARKER = "COMMITTED"
PREFIX = "step_"
UNIVERSAL_SUFFIX = "_universal"


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a quota, a lost mount): one message
    naming the folder and why, so the launcher reports it instead of torch's writer's internals."""


# A write that fails for these reasons is the disk's doing, not the checkpoint's.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _free_mib(folder: Path) -> float | None:
    for p in (folder, *folder.parents):
        try:
            return shutil.disk_usage(p).free / 2**20
        except OSError:
            continue
    return None


def write(engine, root: Path, tag: str, client: dict, step: int, rank: int) -> None:
    """This rank's part of checkpoint `tag` through DeepSpeed; a failed write raises
    `CheckpointWriteError` naming the folder (and the disk's free space), with the last committed
    checkpoint, which nothing here touches, named as the one a rerun resumes from."""
    folder = Path(root) / tag
    _inject_disk_full(engine, step, rank)
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports a full disk as "unexpected pos ..." / "file write failed"
        # with no path, so the reason is said here from the errno or the free space left.
        free = _free_mib(folder)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            reason = f"{os.strerror(e.errno)}" + (f" writing {e.filename}" if e.filename else "")
        elif free is not None and free < 64:
            reason = f"no space left on device ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        else:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        last = latest(Path(root))
        kept = (f"the last committed checkpoint {Path(root) / last[1]} is intact; free space and run the same "
                f"command again to resume from it") if last else "no earlier checkpoint was committed"
        space = f" ({free:.0f} MiB free there)" if free is not None else ""
        raise CheckpointWriteError(e.errno if isinstance(e, OSError) else errno.EIO,
                                   f"{folder}: checkpoint of step {step} not written: {reason}{space}; {kept}") from None


def _inject_disk_full(engine, step: int, rank: int) -> None:
    """Fault injection for tests of a full disk: VITPIPE_FAULT="enospc:<step>:<rank>" makes that
    rank's checkpoint writer write half of its first file and then fail as a full disk does."""
    if os.environ.get("VITPIPE_FAULT") != f"enospc:{step}:{rank}":
        return
    import io

    import torch

    def full_disk_save(state_dict, path):
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    engine.checkpoint_engine.save = full_disk_save


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint that must not be loaded: files that differ from its marker's digests, or that
    hold objects a checkpoint never holds (code that would run on unpickling)."""


def safe_globals() -> list:
    """The non-tensor types DeepSpeed's checkpoints hold (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3 checkpoints): the loss
    scalers (static for fp32/bf16, dynamic for fp16), the ZeRO stage enum, fragment addresses and
    numpy arrays (the RNG states we store). A type missing here fails resume safely, by name.
    None of them runs code when rebuilt: plain attribute dicts, an enum, a namedtuple, arrays."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, reconstruct, np.ndarray, np.dtype,
            *{type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "bool", "uint8")}]


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative POSIX path -> hex), the marker excepted."""
    out = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MARKER):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[path.relative_to(folder).as_posix()] = h.hexdigest()
    return out


def _unpickling_reason(message: str) -> str:
    """The line of torch's weights-only error that says what was refused (it opens with advice)."""
    import re

    if found := re.search(r"Unsupported global: GLOBAL (\S+)", message):
        return f"the global {found.group(1)}"
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return message.strip().splitlines()[0] if message.strip() else ""


def verify(root: Path, tag: str) -> None:
    """Raise `UnsafeCheckpoint` naming the file unless `tag` is exactly what its marker recorded
    and every .pt file in it unpickles with the weights-only unpickler (nothing else loads it first)."""
    import torch

    folder = Path(root) / tag
    try:
        recorded = json.loads((folder / MARKER).read_text()).get("files")
    except (OSError, json.JSONDecodeError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict) or not recorded:
        raise UnsafeCheckpoint(f"{folder}: its {MARKER} marker records no file digests, so it was not committed by "
                               "this vitpipe; refusing to load it (delete it to resume from an older checkpoint, "
                               "or rerun with --force to start over)")
    actual = file_digests(folder)
    for name in sorted(set(recorded) | set(actual)):
        if name not in actual:
            raise UnsafeCheckpoint(f"{folder / name}: listed in {MARKER} but missing; refusing to load {tag}")
        if name not in recorded:
            raise UnsafeCheckpoint(f"{folder / name}: not part of the committed checkpoint (not in {MARKER}); "
                                   f"refusing to load {tag}")
        if actual[name] != recorded[name]:
            raise UnsafeCheckpoint(f"{folder / name}: sha256 differs from the one recorded at commit; "
                                   f"refusing to load {tag}")
    allowed = safe_globals()
    for name in actual:
        if not name.endswith(".pt"):
            continue
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(folder / name, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
            reason = _unpickling_reason(str(e)) or type(e).__name__
            raise UnsafeCheckpoint(f"{folder / name}: holds objects a training checkpoint never holds ({reason}); "
                                   f"refusing to load {tag}: it may run code") from None


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
            "mlflow_run_id": mlflow_run_id, "files": file_digests(root / tag)}
    try:
        write_json(root / tag / MARKER, info, indent=None)  # atomic: a failed write leaves no marker
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"{root / tag / MARKER}: commit marker not written: "
                                   f"{os.strerror(e.errno) if e.errno else e}; {tag} stays uncommitted") from None


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
            if (d / MARKER).is_file():  # a committed checkpoint is never deleted without a word
                print(f"[checkpoints] deleting {d}: keep_checkpoints={keep} keeps the newest {keep}", flush=True)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def to_universal(root: Path, tag: str) -> str:
    """Convert `tag` with DeepSpeed's ds_to_universal (once) so another number of ranks can load it."""
    import subprocess
    import sys

    out = f"{tag}{UNIVERSAL_SUFFIX}"
    if (root / out / MARKER).is_file():
        verify(root, out)  # a conversion found on disk is loaded only if it is ours, unchanged
        return out
    verify(root, tag)  # ds_to_universal unpickles with weights_only=False
    shutil.rmtree(root / out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(root / tag), "--output_folder", str(root / out), "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{root / tag}: conversion to a universal checkpoint failed:\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    write_json(root / out / MARKER, {"converted_from": tag, "files": file_digests(root / out)}, indent=None)
    return out
