"""Ranks live no longer than whoever launched them.

torchrun starts each rank in a session of its own, so killing a job's process group (``kill -9``
of vitpipe and torchrun, or vitpipe dying of a full disk) used to leave the ranks training and
committing checkpoints. Linux's parent-death signal closes that: the rank (and torchrun, started
by `launch_local`) asks the kernel for SIGKILL the moment its parent exits, whatever way it exits.
A rank also checks, before committing a checkpoint, that its parent is still the one it started
under, so a job whose launcher is gone never commits afterwards, even where the signal is missing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# The exit status of a job that stopped on request after committing a checkpoint (preemption,
# a time limit): EX_TEMPFAIL from sysexits.h, "temporary failure, try again". The ranks exit with
# it, `vitpipe` passes it on, and the SLURM scripts requeue on it.
REQUEUE_EXIT = 75

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_parent_at_start: int | None = None


def die_with_parent() -> bool:
    """Have this process SIGKILLed when its parent exits; False where the OS cannot (not Linux).

    Safe to call between fork and exec (a `subprocess` preexec_fn): the setting survives exec.
    """
    global _parent_at_start
    parent = os.getppid()
    _parent_at_start = parent
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def launcher_alive() -> bool:
    """Whether the parent this process started under (see `die_with_parent`) is still its parent."""
    return _parent_at_start is None or os.getppid() == _parent_at_start
