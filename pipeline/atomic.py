"""The one atomic writer: readers see the old state or the complete new one, never half.

Every writer in vitpipe that leaves a file or folder other processes read (weights, manifests,
shards, ONNX files, checkpoints' commit markers, stage records, launch files) goes through this
module. The rule, once:

- the new content is written under a *unique* temporary name in the destination's own folder
  (same filesystem, so the rename is atomic; unique, so two writers never share a temporary),
- flushed to disk with fsync where a crash must not leave an empty file behind a valid name,
- renamed over the destination with `os.replace` (and the folder fsynced so the rename survives),
  with the mode a plain `open()` / `mkdir()` would give it (the umask's, not mkstemp's 0o600),
- removed on any failure, so nothing half-written is left looking complete.

`atomic_path` hands the temporary name to writers that want a path (torch.save, onnx.save,
safetensors); `atomic_dir` does the same for a folder (the old folder is swapped out only once
the new one is complete).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"


def _tmp_name(path: Path) -> str:
    # Hidden, names the destination and the writer's pid; tempfile adds randomness on top.
    return f".{path.name}{TMP_MARK}{os.getpid()}-"


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, and a thread creating a
    file in between would get mode 0o666/0o777)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # no /proc: the brief window is narrowed to the most private mode
    os.umask(mask)
    return mask


def _usual_mode(path: Path, folder: bool) -> None:
    """Give `path` the mode `open()` / `mkdir()` would have: mkstemp and mkdtemp make 0o600 / 0o700,
    which left every manifest, shard folder, weights file and ONNX model unreadable to the group
    (a team's shared dataset, a serving container running as another user)."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform or filesystem lets a folder be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a unique temporary path beside `path`; on success rename it into place, on error remove it.

    Use it for writers that take a file name: `with atomic_path(p) as tmp: torch.save(obj, tmp)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_tmp_name(path), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync and tmp.exists():
            _fsync_file(tmp)
        if not tmp.is_symlink():
            _usual_mode(tmp, folder=tmp.is_dir())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a unique, empty temporary folder beside `path`; on success it replaces `path`.

    An existing `path` is moved aside only once the new folder is complete, then removed; on error
    the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(path), dir=path.parent))
    _usual_mode(tmp, folder=True)
    try:
        yield tmp
        if fsync:
            for f in tmp.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    _fsync_file(f)
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=_tmp_name(path) + "old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if fsync:
        _fsync_dir(path.parent)


def move_into_place(src: str | Path, dest: str | Path, fsync: bool = True) -> Path:
    """Rename the finished file `src` over `dest` (same filesystem), flushed first.

    For writers that must pick their files' names themselves (ONNX's external data is found by
    the name the model records), or to set a finished file aside (`x.onnx` -> `x.onnx.failed`).
    """
    src, dest = Path(src), Path(dest)
    if fsync:
        _fsync_file(src)
    os.replace(src, dest)
    if fsync:
        _fsync_dir(dest.parent)
    return dest


def write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> Path:
    """Write `data` to a unique temporary name beside `path`, then rename it into place."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | Path, text: str, fsync: bool = True) -> Path:
    """`write_bytes` of `text` (UTF-8)."""
    return write_bytes(path, text.encode(), fsync=fsync)


def write_json(path: str | Path, data: Any, indent: int | None = 2, fsync: bool = True) -> Path:
    """`write_text` of `data` as JSON (non-JSON values, such as paths, written as strings)."""
    return write_text(path, json.dumps(data, indent=indent, default=str), fsync=fsync)


def is_temporary(path: str | Path) -> bool:
    """Whether `path` is a leftover temporary of this module (for listings and clean-up)."""
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def _writer_alive(path: Path) -> bool:
    """Whether the process that owns temporary `path` still runs (then its file is not a leftover)."""
    pid = path.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Remove temporaries that dead writers left in `folder` (not recursive); return what was removed.

    A temporary whose writer's pid is still running is kept: it is a write in progress.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if is_temporary(p) and not _writer_alive(p):
            _remove(p)
            removed.append(p)
    return removed
