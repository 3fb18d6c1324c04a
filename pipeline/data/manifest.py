"""The shard manifest: the file contract between `prepare` and every stage that reads images.

``manifest.json`` sits next to a ``shards/`` folder and lists, per split, each shard's file name
(relative to the manifest's folder), sample count, size and sha256. It is written last and
atomically, so a manifest that exists describes shards that were completely written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.config import DataConfig

MANIFEST_FORMAT = "vitpipe.shards/1"
MANIFEST_NAME = "manifest.json"
IMAGE_SUFFIXES = ("png", "jpg")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DataError(ValueError):
    """A dataset, shard or manifest that cannot be used; the message names the file and the problem."""


@dataclass
class Manifest:
    """A loaded, schema-checked manifest; shard names resolve against `root`."""

    path: Path
    root: Path
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

    def shard_paths(self, split: str) -> list[Path]:
        """Absolute paths of the shards of `split`, in manifest order."""
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


def load_manifest(path: str | Path) -> Manifest:
    """Read and schema-check a manifest (`path` is the file or the folder holding manifest.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; run the prepare stage first")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    _check_schema(info, path)
    return Manifest(
        path=path,
        root=path.parent,
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


def _check_schema(info: Any, path: Path) -> None:
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


def verify_manifest(manifest: Manifest, check_hashes: bool = True) -> None:
    """Check every shard exists and matches its recorded size, sha256 and sample count."""
    for split in manifest.splits:
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


# --------------------------------------------------------------------------- prepare


def _created() -> str:
    """UTC time of writing; SOURCE_DATE_EPOCH (the reproducible-builds variable) pins it."""
    from datetime import datetime, timezone

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return when.isoformat(timespec="seconds")


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
    if not target.is_s3:
        Path(target.local).mkdir(parents=True, exist_ok=True)
    # drop the old manifest first: while shards are rewritten nothing may look complete
    target.delete(MANIFEST_NAME)
    source = load_source(cfg, lazy=True)
    if not source.samples:
        raise DataError(f"data.source {cfg.source}: the dataset is empty (after limit={cfg.limit})")
    train, val = split_train_val(source.samples, cfg.val_fraction, cfg.seed)
    written = write_dataset_shards(
        {"train": train, "val": val},
        target,
        max_samples=cfg.shard_max_samples,
        max_bytes=cfg.shard_max_bytes,
        options=EncodeOptions(cfg.image_format, cfg.resize_shorter_side),
        workers=cfg.workers,
    )
    geometry = set().union(*(w.geometry for w in written.values()))  # of the stored (resized) images
    sizes = {(h, w) for h, w, _ in geometry}
    splits = {name: {"samples": len(samples), "shards": written[name].records}
              for name, samples in (("train", train), ("val", val))}
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
        "created": _created(),
    }
    if not target.is_s3:
        return write_manifest(target.local, info)
    _check_schema(info, Path(MANIFEST_NAME))
    target.put_bytes((json.dumps(info, indent=2) + "\n").encode(), MANIFEST_NAME)  # last
    return target.location(MANIFEST_NAME)
