"""The shard manifest: the file contract between `prepare` and every stage that reads images.

``manifest.json`` sits next to a ``shards/`` folder and lists, per split, each shard's file name
(relative to the manifest's folder), sample count, size and sha256. It is written last and
atomically, so a manifest that exists describes shards that were completely written.

A manifest is read from a local file or folder, or from a URL: ``s3://bucket/prefix`` or
``http(s)://host/path`` (a URL ending in ``.json`` is the manifest itself; otherwise
``/manifest.json`` is appended). Shard names resolve against the manifest's folder either way:
`Manifest.shard_location` gives the path or URL to read a shard from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.config import DataConfig

MANIFEST_FORMAT = "vitpipe.shards/1"
MANIFEST_NAME = "manifest.json"
IMAGE_SUFFIXES = ("png", "jpg")
URL_SCHEMES = ("s3://", "http://", "https://")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# what Path() makes of a URL: it collapses "//", so "s3://b/k" becomes "s3:/b/k"
_COLLAPSED_URL = re.compile(r"^(s3|https?):/[^/]")


class DataError(ValueError):
    """A dataset, shard or manifest that cannot be used; the message names the file and the problem."""


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
        """True when the manifest (and so, by default, its shards) is at an s3:// or http(s):// URL."""
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
        if self.folder.startswith("s3://"):
            return f"{self.folder}/{name}"  # object keys are used as they are
        return f"{self.folder}/{urllib.parse.quote(name, safe='/')}"

    def shard_locations(self, split: str) -> list[str]:
        """Paths or URLs of the shards of `split`, in manifest order (for `stream.open_url`)."""
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
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    _check_schema(info, path)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, path)  # readers see either no manifest or a complete one
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- reading


def is_url(location: str | Path) -> bool:
    """True for an s3://, http:// or https:// URL (a Path never is: it collapses the "//")."""
    return isinstance(location, str) and location.startswith(URL_SCHEMES)


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


def read_url(url: str, what: str = "manifest") -> bytes:
    """The bytes at an s3:// or http(s):// URL; a DataError naming the URL if they cannot be fetched."""
    from pipeline.data.stream import open_url  # here: stream.py imports this module

    try:
        stream = open_url(url)
    except DataError as e:  # "<url>: cannot open (<why>)": keep the why
        detail = re.sub(r"^cannot open(?: shard)? \((.*)\)$", r"\1", str(e).removeprefix(f"{url}: "), flags=re.S)
        raise DataError(f"{url}: cannot fetch the {what} ({detail})") from None
    try:
        return stream.read()
    except Exception as e:  # OS, HTTP and botocore errors while the body streams
        raise DataError(f"{url}: reading the {what} failed ({type(e).__name__}: {e})") from None
    finally:
        stream.close()


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
    _check_schema(info, where)
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


def _check_schema(info: Any, path: Path | str) -> None:
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


def count_tar_samples(path: str | Path, num_classes: int | None = None) -> int:
    """Distinct sample keys in a shard, checking each has one image and a valid .cls label."""
    # imported here: webdataset imports torch, which prepare's worker processes do not need
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                # group members exactly the way webdataset will when the loader reads them
                key, suffix = base_plus_ext(member.name)
                if key is None:
                    raise DataError(f"{path}: member {member.name!r} has no extension")
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise DataError(f"{path}: member {member.name!r} is truncated")
                samples.setdefault(key, {})[suffix.lower()] = data
    except tarfile.TarError as e:
        raise DataError(f"{path}: not a readable tar file ({e})") from None
    for key, parts in samples.items():
        if not any(s in parts for s in IMAGE_SUFFIXES):
            raise DataError(f"{path}: sample {key!r} has no image (.png or .jpg); it has {sorted(parts)}")
        if "cls" not in parts:
            raise DataError(f"{path}: sample {key!r} has no .cls label")
        try:
            label = int(parts["cls"].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise DataError(f"{path}: sample {key!r} has a non-integer .cls: {parts['cls'][:20]!r}") from None
        if num_classes is not None and not 0 <= label < num_classes:
            raise DataError(f"{path}: sample {key!r} has label {label}, outside 0..{num_classes - 1}")
    return len(samples)


def verify_manifest(manifest: Manifest, check_hashes: bool = True, train_base_url: str | None = None) -> None:
    """Check every shard exists and matches its recorded size, sha256 and sample count.

    For a manifest at a URL only existence and size are checked, with one HEAD request per shard
    (`check_hashes` does not apply): hashing would download the whole dataset before training, and
    every reader checks each shard's size, sha256 and sample count as it streams anyway. The same
    holds for train shards read from `train_base_url` (pretrain.shard_base_url) instead of beside
    the manifest.
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
        for shard, path in zip(manifest.shards(split), manifest.shard_paths(split)):
            if not path.is_file():
                raise DataError(f"{path}: shard listed in {manifest.path} is missing")
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise DataError(
                    f"{path}: size is {size} bytes but {manifest.path} records {shard['bytes']} "
                    "(truncated or rewritten shard)"
                )
            if check_hashes:
                digest = file_sha256(path)
                if digest != shard["sha256"]:
                    raise DataError(
                        f"{path}: sha256 is {digest} but {manifest.path} records {shard['sha256']}"
                    )
            count = count_tar_samples(path, manifest.num_classes)
            if count != shard["samples"]:
                raise DataError(
                    f"{path}: holds {count} samples but {manifest.path} records {shard['samples']}"
                )


def _verify_sizes(manifest: Manifest, where: list[tuple[str, list[str]]], threads: int = 16) -> None:
    """Every shard at its location (URL or local path) exists and has its recorded size (HEAD
    requests or stat, in parallel); `where` pairs each split with its shards' locations."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.storage import MissingObject, url_size

    checks = [(loc, rec) for split, locations in where for loc, rec in zip(locations, manifest.shards(split))]

    def check(item: tuple[str, dict]) -> str | None:
        location, record = item
        try:
            if is_url(location):
                size = url_size(location)
            else:
                path = Path(location[7:] if location.startswith("file://") else location)
                if not path.is_file():
                    raise MissingObject(location)
                size = path.stat().st_size
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


# --------------------------------------------------------------------------- prepare


def _created() -> str:
    """UTC time of writing; SOURCE_DATE_EPOCH (the reproducible-builds variable) pins it."""
    from datetime import datetime, timezone

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return when.isoformat(timespec="seconds")


_STAGING_PREFIX = ".prepare-staging-"


def _swap_in(staging: Path, final: Path) -> Path:
    """Replace final's shards/ and manifest with the complete ones in `staging`; the new manifest.

    The old manifest goes first, so at no moment does a manifest describe shards it did not list:
    for the instant of two renames there is none, then the new one."""
    (final / MANIFEST_NAME).unlink(missing_ok=True)
    old = final / f"{_STAGING_PREFIX}old-{os.getpid()}"
    if (final / "shards").exists():
        os.replace(final / "shards", old)
    os.replace(staging / "shards", final / "shards")
    os.replace(staging / MANIFEST_NAME, final / MANIFEST_NAME)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return final / MANIFEST_NAME


def prepare_dataset(cfg: DataConfig, out_dir: str | Path) -> Path | str:
    """Load `cfg`'s source, split it, write train/val shards in parallel, then the manifest.

    `out_dir` is a local folder or ``s3://bucket/prefix``; returns the manifest's path (local) or
    URL (S3). Shards are written (uploaded) as each completes, the manifest last, so a reader never
    sees a manifest describing shards that are not all there. The same source and options give
    byte-identical shards and manifest (up to `created`) for any `cfg.workers`.
    """
    # imported here because sources and shards import DataError from this module
    from pipeline.data.shards import EncodeOptions, write_dataset_shards
    from pipeline.data.sources import load_source, split_train_val
    from pipeline.data.storage import OutputTarget

    target = OutputTarget.parse(out_dir)
    source = load_source(cfg, lazy=True)
    if not source.samples:
        raise DataError(f"data.source {cfg.source}: the dataset is empty (after limit={cfg.limit})")
    train, val = split_train_val(source.samples, cfg.val_fraction, cfg.seed)
    shard_options = dict(max_samples=cfg.shard_max_samples, max_bytes=cfg.shard_max_bytes,
                         options=EncodeOptions(cfg.image_format, cfg.resize_shorter_side), workers=cfg.workers,
                         max_corrupt_fraction=cfg.max_corrupt_fraction)
    if target.is_s3:
        # drop the old manifest first: while shards are rewritten nothing may look complete
        target.delete(MANIFEST_NAME)
        written = write_dataset_shards({"train": train, "val": val}, target, **shard_options)
        staging = None
    else:
        # A local dataset is built beside the old one and swapped in once complete: the previous
        # manifest and its shards stay usable until then (a failed or interrupted rerun keeps them).
        final = Path(target.local)
        final.mkdir(parents=True, exist_ok=True)
        for stale in final.glob(f"{_STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run (the stage lock keeps one writer)
        staging = final / f"{_STAGING_PREFIX}{os.getpid()}"
        try:
            written = write_dataset_shards({"train": train, "val": val}, OutputTarget.parse(staging), **shard_options)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # the previous dataset is untouched
            raise
    geometry = set().union(*(w.geometry for w in written.values()))  # of the stored (resized) images
    sizes = {(h, w) for h, w, _ in geometry}
    splits = {name: {"samples": written[name].samples, "shards": written[name].records} for name in ("train", "val")}
    skipped = [s.to_dict(name) for name in ("train", "val") for s in written[name].skipped]
    info = {
        "format": MANIFEST_FORMAT,
        "source": cfg.source,
        "class_names": source.class_names,
        "num_classes": len(source.class_names),
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "channels": 1 if all(c == 1 for _, _, c in geometry) else 3,
        "image_format": cfg.image_format,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "shard_max_samples": cfg.shard_max_samples,
        "shard_max_bytes": cfg.shard_max_bytes,
        "resize_shorter_side": cfg.resize_shorter_side,
        "splits": splits,
        "max_corrupt_fraction": cfg.max_corrupt_fraction,
        "skipped": skipped,
        "created": _created(),
    }
    if staging is not None:
        write_manifest(staging, info)  # checked against the schema before anything is swapped
        return _swap_in(staging, Path(target.local))
    _check_schema(info, Path(MANIFEST_NAME))
    target.put_bytes((json.dumps(info, indent=2) + "\n").encode(), MANIFEST_NAME)  # last
    return target.location(MANIFEST_NAME)
