"""The shard manifest: the file contract between `prepare` and every stage that reads images.

``manifest.json`` sits next to a ``shards/`` folder and lists, per split, each shard's file name
(relative to the manifest's folder), sample count, size and sha256. It is written last and
atomically, so a manifest that exists describes shards that were completely written.

A manifest is read from a local file or folder, or from a URL: ``s3://bucket/prefix``,
``http(s)://host/path`` or ``pipe:<command> <path>`` (a URL ending in ``.json`` is the manifest
itself; otherwise ``/manifest.json`` is appended). Shard names resolve against the manifest's
folder either way: `Manifest.shard_location` gives the path or URL to read a shard from.

This module owns the schema, loading and the pre-flight check (`verify_manifest`); the bytes come
through `storage`, the shards are read by `shard_format`, and `prepare` writes datasets.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.atomic import write_text
from pipeline.run_layout import MANIFEST_FILE
from pipeline.data.errors import DataError, MissingObject
from pipeline.data.shard_format import IMAGE_SUFFIXES, read_shard
from pipeline.data.storage import is_url, object_size, open_url, read_url

MANIFEST_FORMAT = "vitpipe.shards/1"
MANIFEST_NAME = MANIFEST_FILE  # the one spelling of the name, in the run layout (pipeline/run_layout.py)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# what Path() makes of a URL: it collapses "//", so "s3://b/k" becomes "s3:/b/k"
_COLLAPSED_URL = re.compile(r"^(s3|https?):/[^/]")


@dataclass
class Manifest:
    """A loaded, schema-checked manifest; shard names resolve against its `folder` (a path or URL)."""

    path: Path | str
    """The manifest file: a local Path, or its s3:// or http(s):// URL."""
    folder: str
    """The manifest's folder, a local path or URL without a trailing slash; shard names resolve against it."""
    source: str
    class_names: list[str]
    image_size: list[int] | None
    channels: int
    image_format: str
    seed: int
    val_fraction: float
    splits: dict[str, list[dict]]

    @property
    def num_classes(self) -> int:
        """Number of classes (length of `class_names`)."""
        return len(self.class_names)

    def shards(self, split: str) -> list[dict]:
        """The shard records ({name, samples, bytes, sha256}) of `split`."""
        if split not in self.splits:
            raise DataError(f"{self.path}: no split {split!r}; the manifest has {sorted(self.splits)}")
        return self.splits[split]

    @property
    def is_remote(self) -> bool:
        """True when the manifest (and so, by default, its shards) is at an s3://, http(s):// or pipe: URL."""
        return is_url(self.folder)

    @property
    def root(self) -> Path:
        """The local folder holding the manifest; a DataError for a manifest at a URL (use `shard_location`)."""
        if self.is_remote:
            raise DataError(f"{self.path}: the manifest is at a URL, not in a local folder; "
                            "read its shards through shard_location()/shard_locations()")
        return Path(self.folder)

    def shard_location(self, name: str) -> str:
        """Where the shard called `name` (a record's "name") is read from: a local path or a URL."""
        if not self.is_remote:
            return str(Path(self.folder) / name)
        if not self.folder.startswith(("http://", "https://")):
            return f"{self.folder}/{name}"  # S3 object keys and pipe: commands take names as they are
        return f"{self.folder}/{urllib.parse.quote(name, safe='/')}"

    def shard_locations(self, split: str) -> list[str]:
        """Paths or URLs of the shards of `split`, in manifest order (for `storage.open_url`)."""
        return [self.shard_location(s["name"]) for s in self.shards(split)]

    def shard_paths(self, split: str) -> list[Path]:
        """Local paths of the shards of `split`, in manifest order; a DataError for a manifest at a URL."""
        return [self.root / s["name"] for s in self.shards(split)]

    def num_samples(self, split: str) -> int:
        """Total samples in `split`."""
        return sum(s["samples"] for s in self.shards(split))


# --------------------------------------------------------------------------- writing


def write_manifest(out_dir: str | Path, info: dict) -> Path:
    """Check `info` against the schema and write it as out_dir/manifest.json atomically."""
    path = Path(out_dir) / MANIFEST_NAME
    check_schema(info, path)
    write_text(path, manifest_text(info))  # readers see either no manifest or a complete one
    return path


def manifest_text(info: dict) -> str:
    """The manifest file's text (one layout for local files and uploads)."""
    return json.dumps(info, indent=2) + "\n"


# --------------------------------------------------------------------------- reading


def manifest_url(url: str) -> str:
    """The manifest's URL: `url` itself when it ends in .json, else `url`/manifest.json."""
    return url if url.endswith(".json") else f"{url.rstrip('/')}/{MANIFEST_NAME}"


def manifest_location(manifest: str | Path) -> str:
    """The manifest file a stage reads, as a string: its URL, or the absolute local path.

    Accepts what `load_manifest` accepts (a file, a folder, a URL with or without manifest.json).
    Stages record this string in their job and fingerprint, so ranks read the same manifest.
    """
    if is_url(manifest):
        return manifest_url(manifest)
    _refuse_collapsed_url(manifest)
    path = Path(manifest).resolve()
    return str(path / MANIFEST_NAME if path.is_dir() else path)


def _refuse_collapsed_url(path: str | Path) -> None:
    """A DataError for a URL that went through Path() ("s3:/bucket/...") instead of a baffling not-found."""
    if _COLLAPSED_URL.match(str(path)):
        raise DataError(f"{path}: looks like a URL whose '//' was lost (it was made into a file path); "
                        "pass the URL as a string, e.g. s3://bucket/prefix")


def load_manifest(path: str | Path) -> Manifest:
    """Read and schema-check a manifest.

    `path` is the manifest file or the local folder holding manifest.json, or a URL:
    ``s3://bucket/prefix[/manifest.json]`` or ``http(s)://host/path[/manifest.json]``.
    """
    if is_url(path):
        url = manifest_url(path)
        return _manifest_from_bytes(read_url(url), url, url.rsplit("/", 1)[0])
    _refuse_collapsed_url(path)
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; run the prepare stage first")
    return _manifest_from_bytes(path.read_bytes(), path, str(path.parent))


def _manifest_from_bytes(data: bytes, where: Path | str, folder: str) -> Manifest:
    """Parse and schema-check manifest bytes read from `where` (a Path or URL); shards resolve in `folder`."""
    try:
        info = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON: {e}") from None
    check_schema(info, where)
    return Manifest(
        path=where,
        folder=folder,
        source=info["source"],
        class_names=list(info["class_names"]),
        image_size=list(info["image_size"]) if info["image_size"] is not None else None,
        channels=info["channels"],
        image_format=info["image_format"],
        seed=info["seed"],
        val_fraction=float(info["val_fraction"]),
        splits={name: [dict(s) for s in split["shards"]] for name, split in info["splits"].items()},
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schema(info: Any, path: Path | str) -> None:
    """Raise DataError naming `path` and the field if `info` is not a valid manifest."""

    def fail(msg: str) -> None:
        raise DataError(f"{path}: {msg}")

    if not isinstance(info, dict):
        fail(f"expected a JSON object, got {type(info).__name__}")
    if info.get("format") != MANIFEST_FORMAT:
        fail(f"format is {info.get('format')!r}, expected {MANIFEST_FORMAT!r}; re-run prepare")
    required = ("source", "class_names", "num_classes", "image_size", "channels", "image_format",
                "seed", "val_fraction", "splits", "created")
    missing = [k for k in required if k not in info]
    if missing:
        fail(f"missing field(s) {', '.join(missing)}")
    if not isinstance(info["source"], str):
        fail(f"source must be a string, got {info['source']!r}")
    names = info["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        fail(f"class_names must be a non-empty list of strings, got {names!r}")
    if len(set(names)) != len(names):
        fail("class_names has duplicates")
    if info["num_classes"] != len(names):
        fail(f"num_classes is {info['num_classes']!r} but class_names has {len(names)} entries")
    size = info["image_size"]
    if size is not None and not (
        isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)
    ):
        fail(f"image_size must be [height, width] or null, got {size!r}")
    if info["channels"] not in (1, 3) or not _is_int(info["channels"]):
        fail(f"channels must be 1 or 3, got {info['channels']!r}")
    if info["image_format"] not in IMAGE_SUFFIXES:
        fail(f"image_format must be one of {IMAGE_SUFFIXES}, got {info['image_format']!r}")
    if not _is_int(info["seed"]):
        fail(f"seed must be an integer, got {info['seed']!r}")
    if isinstance(info["val_fraction"], bool) or not isinstance(info["val_fraction"], (int, float)):
        fail(f"val_fraction must be a number, got {info['val_fraction']!r}")
    splits = info["splits"]
    if not isinstance(splits, dict) or "train" not in splits:
        fail("splits must be an object with at least a 'train' split")
    for split, entry in splits.items():
        where = f"splits.{split}"
        if not isinstance(entry, dict) or not _is_int(entry.get("samples")) or not isinstance(
            entry.get("shards"), list
        ):
            fail(f"{where} must be {{samples: int, shards: [...]}}, got {entry!r}")
        total = 0
        for i, shard in enumerate(entry["shards"]):
            _check_shard_record(shard, f"{where}.shards[{i}]", fail)
            total += shard["samples"]
        if total != entry["samples"]:
            fail(f"{where}.samples is {entry['samples']} but its shards hold {total}")


def _check_shard_record(shard: Any, where: str, fail) -> None:
    if not isinstance(shard, dict):
        fail(f"{where} must be an object, got {shard!r}")
    name = shard.get("name")
    # names resolve against the manifest's folder; anything that could escape it is refused
    if not isinstance(name, str) or not name or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        fail(f"{where}.name must be a relative path inside the dataset folder, got {name!r}")
    for key in ("samples", "bytes"):
        if not _is_int(shard.get(key)) or shard[key] < 1:
            fail(f"{where}.{key} must be a positive integer, got {shard.get(key)!r}")
    if not isinstance(shard.get("sha256"), str) or not _SHA256.match(shard["sha256"]):
        fail(f"{where}.sha256 must be 64 lowercase hex digits, got {shard.get('sha256')!r}")


# --------------------------------------------------------------------------- verification


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_manifest(manifest: Manifest, check_hashes: bool = True, train_base_url: str | None = None) -> None:
    """The pre-flight check: every shard exists with its recorded size and, for a local dataset, its
    sha256 (`check_hashes`), sample count and labels, read by the one shard reader training uses.

    For a manifest at a URL only existence and size are checked, with one HEAD request per shard
    (`check_hashes` does not apply; a pipe: command's size cannot be asked, so it is left to the
    reader): hashing would download the whole dataset before training, and every reader checks each
    shard's size and sha256 before it releases a sample. The same holds for train shards read from
    `train_base_url` (pretrain.shard_base_url) instead of beside the manifest.
    """
    if manifest.is_remote:
        _verify_sizes(manifest, [(split, manifest.shard_locations(split)) for split in manifest.splits])
        return
    if train_base_url:
        base = train_base_url.rstrip("/")
        _verify_sizes(manifest, [("train", [f"{base}/{r['name']}" for r in manifest.shards("train")])])
    for split in manifest.splits:
        if train_base_url and split == "train":
            continue
        _verify_sizes(manifest, [(split, [str(p) for p in manifest.shard_paths(split)])], threads=1)
        for shard, path in zip(manifest.shards(split), manifest.shard_paths(split)):
            for _ in read_shard(open_url(str(path)), shard, str(path), manifest.num_classes, check_hash=check_hashes):
                pass


def _verify_sizes(manifest: Manifest, where: list[tuple[str, list[str]]], threads: int = 16) -> None:
    """Every shard at its location (URL or local path) exists and has its recorded size (HEAD
    requests or stat, in parallel); `where` pairs each split with its shards' locations."""
    checks = [(loc, rec) for split, locations in where for loc, rec in zip(locations, manifest.shards(split))]

    def check(item: tuple[str, dict]) -> str | None:
        location, record = item
        try:
            size = object_size(location)
        except MissingObject:
            return f"{location}: shard listed in {manifest.path} is missing"
        if size is not None and size != record["bytes"]:
            return (f"{location}: size is {size} bytes but {manifest.path} records {record['bytes']} "
                    "(truncated or rewritten shard)")
        return None

    with ThreadPoolExecutor(max(1, min(threads, len(checks)))) as pool:
        for problem in pool.map(check, checks):
            if problem:
                raise DataError(problem)
