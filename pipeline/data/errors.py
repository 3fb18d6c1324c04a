"""The bottom of data/: the one error type every data module raises.

It sits alone in a module so that every other module of data/ can import it without importing
anything else (no cycle can form through it).
"""

from __future__ import annotations

import errno


class DataError(ValueError):
    """A dataset, shard or manifest that cannot be used; the message names the file and the problem."""


class MissingObject(DataError):
    """The location names no object: HTTP 404/410, S3 NoSuchKey, a local file that is not there."""


def write_error(error: OSError, path: object) -> DataError:
    """A DataError naming `path` for a failed write; a full disk (or quota) is said in plain words."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on device"
    else:
        why = error.strerror or f"{type(error).__name__}: {error}"
    return DataError(f"{path}: cannot write ({why})")
