"""Keep glibc malloc from returning freed memory to the kernel after every large image buffer.

Image work allocates and frees buffers of 100 KB-1 MB per image (decoded pixels, resized copies,
encoder output). glibc trims the top of the heap back to the kernel whenever more than
M_TRIM_THRESHOLD (128 KB by default, raised dynamically only after an mmap'd chunk is freed) is free,
so the next image's buffer faults its pages in again. On this VM page faults are expensive enough
that raising the threshold makes prepare's render + JPEG encode of 224 px images ~1.35-1.4x faster
(`vitpipe bench prepare`; the same effect that makes a process that imported torch encode faster).
The cost is up to `trim_threshold` bytes of freed memory kept per process for reuse.

`tune_malloc()` applies the settings to this process (mallopt) and, through the environment variables
glibc reads at start-up, to every process started from it (spawned pool workers, torchrun ranks);
forked processes inherit them. Values the user already set in the environment win. Other C
libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD = 128 << 20
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
_SETTINGS = (("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD),
             ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def tune_malloc() -> bool:
    """Raise glibc's trim and mmap thresholds here and for child processes; True if this process was tuned.

    Both, never one: setting either turns off glibc's dynamic mmap threshold, and a fixed 128 KB mmap
    threshold alone maps and unmaps every image buffer (slower than the default, measured).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    ok = True
    for env, option, default in _SETTINGS:
        value = int(os.environ.get(env) or default)
        os.environ.setdefault(env, str(value))
        ok = bool(mallopt(option, value)) and ok
    return ok
