"""Writing a file so that readers see either the old state or the complete new file, never half."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    return write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """`write_text` of `data` as JSON (non-JSON values, such as paths, written as strings)."""
    return write_text(path, json.dumps(data, indent=indent, default=str))
