"""One writer per folder: an fcntl lock on ``<folder>/.vitpipe.lock`` held while a run or a stage
writes there, so a second ``vitpipe run`` into the same folder refuses at once instead of two runs
deleting each other's files and interleaving their results.

The kernel releases an flock when its holder dies, however it dies, so a lock is never stale in
the sense of blocking; the file keeps the last holder's pid, host and command only to name it.
When the lock is taken and the file names a holder that is gone (a process killed with -9), the
new holder says that it takes over. The file is emptied on release, never deleted: deleting it
would let a process that opened the old file and one that creates a new one both hold "the" lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".vitpipe.lock"


class FolderLocked(RuntimeError):
    """Another process holds the folder's lock; the message names its pid, host and command."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('command')!s}, since {since})"


class FolderLock:
    """``with FolderLock(folder, "vitpipe run"):`` hold `folder`'s lock or raise `FolderLocked`."""

    def __init__(self, folder: str | Path, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]) or "python"
        self._fd: int | None = None
        self._depth = 0

    def _read_holder(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 4096).decode(errors="replace").strip()
            return json.loads(text) if text else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> None:
        """Take the lock (re-entrant within this object), or raise naming the holder."""
        if self._fd is not None:
            self._depth += 1
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            who = _describe(holder) if holder else "another process (it has not written its name yet)"
            raise FolderLocked(f"{self.folder}: in use by {who}; wait for it to finish or stop it "
                               f"(only one vitpipe may write a folder at a time)") from None
        previous = self._read_holder(fd)
        host = socket.gethostname()
        if previous.get("pid") and previous.get("pid") != os.getpid():
            gone = previous.get("host") == host and not _alive(int(previous["pid"]))
            state = "which is no longer running" if gone else "which no longer holds it"
            print(f"vitpipe: {self.folder}: taking over the lock left by {_describe(previous)}, {state}",
                  file=sys.stderr, flush=True)
        me = {"pid": os.getpid(), "host": host, "command": self.command, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd, self._depth = fd, 1

    def release(self) -> None:
        """Give the lock up (after the outermost `acquire`); the file is emptied, not deleted."""
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
