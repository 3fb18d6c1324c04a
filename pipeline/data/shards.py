"""Writing samples into WebDataset tar shards: in parallel, reproducibly and atomically.

`write_dataset_shards` runs two overlapping passes over a process pool, and its output is
byte-identical for any number of workers:

1. encode: fixed chunks of samples, in order, are read (a lazy file is read and fully decoded, as a
   check), resized if asked, and encoded. Bytes that are kept unchanged stay in their source file;
   re-encoded bytes go to a temporary spool file. Each sample comes back as a small
   `StoredSample` record with its exact stored size.
2. write: the shard -> sample plan is one greedy pass in sample order over the exact sizes: a shard
   closes when it holds `max_samples`, or when the next sample would take its tar file past
   `max_bytes` (whichever comes first; a lone sample bigger than the limit gets a shard of its own).
   Tar sizes are exact (512-byte headers, 512-byte padding, 10240-byte records), so the byte limit is
   a guarantee, checked against the written file. A shard is planned as soon as its samples are
   encoded and goes to a worker to be written (then renamed into place, or uploaded to S3) while
   later chunks are still being encoded.

Why two passes and not an estimate: re-encoded (resized) sizes cannot be known without encoding,
and an upper bound from the pixel count would leave shards several times smaller than the limit.
The price is temporary disk for re-encoded images only (kept files are not copied).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import tarfile
import tempfile
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from pipeline.data.errors import DataError, write_error
from pipeline.data.shard_format import IMAGE_SUFFIXES, LABEL_SUFFIX, label_bytes
from pipeline.data.sources import GRAY_MODES, Sample
from pipeline.data.storage import OutputTarget
from pipeline.memory import tune_malloc
from pipeline.progress import Progress

# Fixed tar header fields: with these, identical samples give byte-identical shards. They are the
# fields webdataset's TarWriter writes (ustar format, fields in sorted order), minus the clock.
_TAR_MTIME = 0
_TAR_USER = "vitpipe"
_TAR_MODE = 0o444
_JPEG_QUALITY = 95
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive to a whole record
_ENCODE_CHUNK = 64  # samples per encode task: big enough to amortize IPC, small enough to balance


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`."""
    return f"{split}-{index:06d}.tar"


def default_workers() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored: format for re-encoded pixels and an optional shorter-side cap."""

    image_format: str = "png"
    resize_shorter_side: int | None = None


@dataclass
class StoredSample:
    """One sample as it will be stored: exact size, geometry, and where its bytes are."""

    key: str
    label: int
    ext: str
    nbytes: int
    height: int
    width: int
    channels: int
    path: str | None = None  # stored bytes are exactly this source file
    spool: str | None = None  # ... or spool[offset : offset + nbytes]
    offset: int = 0

    def read(self, spools: dict | None = None) -> bytes:
        """The bytes to store, checked against the size measured when encoding; `spools` keeps spool
        files open across calls (path -> file), which the caller closes."""
        if self.path is not None:
            data = Path(self.path).read_bytes()
        elif spools is not None:
            f = spools.get(self.spool) or spools.setdefault(self.spool, open(self.spool, "rb"))
            f.seek(self.offset)
            data = f.read(self.nbytes)
        else:
            with open(self.spool, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.nbytes)
        if len(data) != self.nbytes:
            raise DataError(f"{self.path or self.spool}: sample {self.key!r} changed size while preparing")
        return data

    @property
    def tar_bytes(self) -> int:
        """Bytes this sample adds to a tar: header + padded data for the image and the .cls member."""
        return _member_bytes(self.nbytes) + _member_bytes(len(label_bytes(self.label)))


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def tar_size(sample_tar_bytes: int) -> int:
    """Size of a tar holding members of `sample_tar_bytes` in all: two end blocks, padded to a record."""
    return -(-(sample_tar_bytes + 2 * _BLOCK) // _RECORD) * _RECORD


def _encode_pil(image: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def resized_size(height: int, width: int, shorter_side: int | None) -> tuple[int, int] | None:
    """(height, width) after capping the shorter side at `shorter_side` (aspect kept); None if no resize."""
    short = min(height, width)
    if shorter_side is None or short <= shorter_side:
        return None
    scale = shorter_side / short
    if height <= width:
        return shorter_side, max(1, round(width * scale))
    return max(1, round(height * scale)), shorter_side


def _resize(image: Image.Image, shorter_side: int | None) -> Image.Image:
    target = resized_size(image.height, image.width, shorter_side)
    if target is None:
        return image
    # BICUBIC in Pillow filters over the whole source footprint when shrinking (antialiased)
    return image.resize((target[1], target[0]), Image.Resampling.BICUBIC)


def store_image(sample: Sample, options: EncodeOptions) -> tuple[str, bytes, tuple[int, int, int], bool]:
    """(ext, bytes, (height, width, channels), kept) for a sample; kept: the original bytes, unchanged.

    png/jpg bytes that need no resize are kept as they are (re-encoding would lose quality or change
    bytes); other formats, resized images and pixel arrays are encoded (a resized png/jpg keeps its
    format, the rest use `options.image_format`).
    """
    if sample.data is not None or sample.path is not None:
        data = sample.read_bytes()  # a lazy file is fully decoded here as a check
        with Image.open(io.BytesIO(data)) as im:
            channels = 1 if im.mode in GRAY_MODES else 3
            target = resized_size(im.height, im.width, options.resize_shorter_side)
            if target is None and sample.ext in IMAGE_SUFFIXES:
                return sample.ext, data, (im.height, im.width, channels), True
            # bmp/webp/gif or a resize: palettes and alpha are flattened to L or RGB
            image = _resize(im.convert("L" if channels == 1 else "RGB"), options.resize_shorter_side)
        fmt = sample.ext if sample.ext in IMAGE_SUFFIXES else options.image_format
        return fmt, _encode_pil(image, fmt), (image.height, image.width, channels), False
    # uint8 HxW becomes mode L and HxWx3 mode RGB (Sample checks dtype and shape)
    pixels = sample.pixels()
    image = _resize(Image.fromarray(np.ascontiguousarray(pixels)), options.resize_shorter_side)
    channels = 1 if pixels.ndim == 2 else 3
    return options.image_format, _encode_pil(image, options.image_format), (image.height, image.width, channels), False


@dataclass
class SkippedSample:
    """A source image that could not be stored (unreadable, truncated, a decompression bomb)."""

    key: str
    path: str | None
    reason: str

    def to_dict(self, split: str) -> dict:
        return {"split": split, "key": self.key, "path": self.path, "reason": self.reason}


def _encode_chunk(task: tuple[int, list[Sample], EncodeOptions, str]) -> tuple[list[StoredSample], list[SkippedSample]]:
    """Pool task: encode one chunk; re-encoded bytes go to <spool_dir>/chunk-<index>.bin. Images
    that cannot be read come back as skipped, with the reason; the caller applies the limit."""
    index, samples, options, spool_dir = task
    spool = Path(spool_dir) / f"chunk-{index:09d}.bin"
    out: list[StoredSample] = []
    skipped: list[SkippedSample] = []
    try:
        f = open(spool, "wb")
    except OSError as e:
        raise write_error(e, spool) from None
    with f:
        for sample in samples:
            try:
                ext, data, (h, w, c), kept = store_image(sample, options)
            except DataError as e:  # read_image_file's verdict on a file (it names the file)
                reason = str(e)
                if sample.path is not None and reason.startswith(f"{sample.path}: "):
                    reason = reason[len(sample.path) + 2:]
                skipped.append(SkippedSample(sample.key, sample.path, reason))
                continue
            record = StoredSample(sample.key, sample.label, ext, len(data), h, w, c)
            if kept and sample.path is not None:
                record.path = sample.path
            else:
                record.spool, record.offset = str(spool), f.tell()
                try:
                    f.write(data)
                except OSError as e:  # a full disk: name the file, not a bare errno
                    raise write_error(e, spool) from None
            out.append(record)
    return out, skipped


# --------------------------------------------------------------------------- planning and writing


class _ShardPlanner:
    """The shard plan built one sample at a time, in sample order: `add` returns a shard's samples
    the moment it closes, so it can be written while later samples are still being encoded.

    A shard closes when it holds `max_samples`, or when the next sample would take its tar file past
    `max_bytes` (a lone sample bigger than the limit gets a shard of its own). Each decision depends
    only on the samples before it, so the plan is the same whether built at once or incrementally.
    """

    def __init__(self, max_samples: int, max_bytes: int | None):
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.current: list[StoredSample] = []
        self.members = 0

    def add(self, sample: StoredSample) -> list[StoredSample] | None:
        """Take the next sample; the shard it closed, if any (the sample starts the next one)."""
        count = len(self.current)
        full = count >= self.max_samples or (
            count > 0 and self.max_bytes is not None and tar_size(self.members + sample.tar_bytes) > self.max_bytes
        )
        closed = None
        if full:
            closed, self.current, self.members = self.current, [], 0
        self.current.append(sample)
        self.members += sample.tar_bytes
        return closed

    def finish(self) -> list[StoredSample] | None:
        """The last, partly filled shard (None if there is none)."""
        last, self.current, self.members = self.current or None, [], 0
        return last


def plan_shards(stored: Sequence[StoredSample], max_samples: int, max_bytes: int | None) -> list[range]:
    """Consecutive sample ranges, one per shard: at most `max_samples` each and, when `max_bytes`
    is set, a tar file of at most `max_bytes` unless a single sample alone is bigger."""
    planner, plan, start = _ShardPlanner(max_samples, max_bytes), [], 0
    for s in stored:
        if closed := planner.add(s):
            plan.append(range(start, start + len(closed)))
            start += len(closed)
    if last := planner.finish():
        plan.append(range(start, start + len(last)))
    return plan


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through (a shard is not read back to hash it)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)


def _write_tar(stored: Sequence[StoredSample], path: Path) -> str:
    """Write the shard to `path`; its sha256."""
    spools: dict = {}
    try:
        with open(path, "wb", buffering=1 << 20) as f:
            stream = _HashingWriter(f)
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for s in stored:
                    # webdataset groups members by key; fields go in sorted order, like its TarWriter
                    for field, data in sorted({s.ext: s.read(spools), LABEL_SUFFIX: label_bytes(s.label)}.items()):
                        info = tarfile.TarInfo(f"{s.key}.{field}")
                        info.size, info.mtime, info.mode = len(data), _TAR_MTIME, _TAR_MODE
                        info.uname = info.gname = _TAR_USER
                        tar.addfile(info, io.BytesIO(data))
    finally:
        for spool in spools.values():
            spool.close()
    return stream.sha.hexdigest()


def _write_shard(task: tuple[str, list[StoredSample], str, OutputTarget]) -> dict:
    """Pool task: write one shard, hash it, and put it under its final name only once complete."""
    name, stored, scratch, target = task
    try:
        with target.writing(name, scratch) as tmp:
            sha256 = _write_tar(stored, tmp)
            size = tmp.stat().st_size
            planned = tar_size(sum(s.tar_bytes for s in stored))
            if size != planned:  # the byte limit relies on this arithmetic, so never let it drift
                raise RuntimeError(f"{name}: wrote {size} bytes but planned {planned}; tar size rule is wrong")
    except OSError as e:  # a full disk: name the shard, not a bare errno
        raise write_error(e, target.location(name)) from None
    return {"name": name, "samples": len(stored), "bytes": size, "sha256": sha256}


@dataclass
class SplitShards:
    """What `write_dataset_shards` wrote for one split: shard records and the stored geometries."""

    records: list[dict]
    geometry: set[tuple[int, int, int]]
    skipped: list[SkippedSample] = field(default_factory=list)
    """Images of this split that could not be read (within `max_corrupt_fraction`), in order."""

    @property
    def samples(self) -> int:
        return sum(r["samples"] for r in self.records)


class _InProcess:
    """The executor interface for workers=1: runs each task at once, here."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to whoever asks for the result, as a pool would
            future.set_exception(e)
        return future

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


def write_dataset_shards(
    splits: dict[str, list[Sample]],
    target: OutputTarget | str | Path,
    *,
    max_samples: int,
    max_bytes: int | None = None,
    options: EncodeOptions = EncodeOptions(),
    workers: int = 0,
    max_corrupt_fraction: float = 0.0,
) -> dict[str, SplitShards]:
    """Encode and write every split's shards as `<split>-%06d.tar` in the folder `target` (records
    are named relative to it).

    `workers` processes (0: all cores; 1: in this process) share both passes; the bytes written
    do not depend on it. Shards of a split left over from an earlier, larger run are removed.
    Images that cannot be read are skipped and listed in each split's `skipped`, up to
    `max_corrupt_fraction` of all samples; one more is a `DataError` listing them (at 0, the first).
    """
    if options.image_format not in IMAGE_SUFFIXES:
        raise DataError(f"data.image_format: must be one of {IMAGE_SUFFIXES}, got {options.image_format!r}")
    if max_samples < 1:
        raise DataError(f"data.shard_max_samples: must be >= 1, got {max_samples}")
    if max_bytes is not None and max_bytes < _RECORD:
        raise DataError(f"data.shard_max_bytes: must be >= {_RECORD} (one tar record), got {max_bytes}")
    for split in splits:
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise DataError(f"split name {split!r}: use letters, digits and '_' only")
    target = target if isinstance(target, OutputTarget) else OutputTarget.parse(target)
    workers = workers or default_workers()
    if target.is_s3:
        scratch_root = None  # system temp dir
    else:
        scratch_root = Path(target.local)
        scratch_root.mkdir(parents=True, exist_ok=True)  # same file system as the shards
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=scratch_root) as scratch:
        chunks = [
            (split, start, samples[start : start + _ENCODE_CHUNK])
            for split, samples in splits.items()
            for start in range(0, len(samples), _ENCODE_CHUNK)
        ]
        pool_size = min(workers, max(1, len(chunks)))
        executor = (
            ProcessPoolExecutor(pool_size, mp_context=get_context("spawn"), initializer=tune_malloc)
            if pool_size > 1 else _InProcess()
        )
        try:
            limit = math.floor(max_corrupt_fraction * sum(len(v) for v in splits.values()))
            results = _encode_and_write(executor, chunks, splits, options, scratch, target,
                                        max_samples, max_bytes, window=2 * pool_size, corrupt_limit=limit)
        finally:
            executor.shutdown(cancel_futures=True)
    for split, result in results.items():
        _remove_stale_shards(target, split, keep=len(result.records))
    return results


def _encode_and_write(executor, chunks: list, splits: dict, options: EncodeOptions, scratch: str,
                      target: OutputTarget, max_samples: int, max_bytes: int | None,
                      window: int, corrupt_limit: int = 0) -> dict[str, SplitShards]:
    """Both passes, overlapped: chunks are encoded `window` at a time, in order; each shard is
    planned and handed to a worker to write as soon as its last sample is encoded, so writing runs
    alongside the encoding of later chunks instead of after all of it."""
    pending: deque[Future] = deque()
    submitted = 0

    def keep_encoding() -> None:
        nonlocal submitted
        while submitted < len(chunks) and len(pending) < window:
            pending.append(executor.submit(_encode_chunk, (submitted, chunks[submitted][2], options, scratch)))
            submitted += 1

    writes: dict[str, list[Future]] = {split: [] for split in splits}
    geometry: dict[str, set] = {split: set() for split in splits}
    planners = {split: _ShardPlanner(max_samples, max_bytes) for split in splits}

    def write(split: str, shard: list[StoredSample]) -> None:
        name = shard_name(split, len(writes[split]))
        writes[split].append(executor.submit(_write_shard, (name, shard, scratch, target)))

    skipped: dict[str, list[SkippedSample]] = {split: [] for split in splits}
    total = sum(len(v) for v in splits.values())
    progress = Progress("[prepare] encoding", total, "images")
    keep_encoding()
    for i, (split, _, _) in enumerate(chunks):
        records, bad = _result(pending.popleft())  # chunks come back in order, whoever encoded them
        progress.update(len(records) + len(bad))
        skipped[split].extend(bad)
        if (n_bad := sum(map(len, skipped.values()))) > corrupt_limit:
            raise DataError(_too_many_corrupt(skipped, n_bad, total, corrupt_limit))
        keep_encoding()
        for record in records:
            geometry[split].add((record.height, record.width, record.channels))
            if closed := planners[split].add(record):
                write(split, closed)
        if i + 1 == len(chunks) or chunks[i + 1][0] != split:  # the split's last chunk
            if last := planners[split].finish():
                write(split, last)
    progress.close()
    return {split: SplitShards([_result(f) for f in writes[split]], geometry[split], skipped[split])
            for split in splits}


def _result(future: Future):
    """A task's result; a worker's DataError without the remote traceback chained to it (the
    message names the file, which is all the user needs)."""
    try:
        return future.result()
    except DataError as e:
        raise e from None


def _too_many_corrupt(skipped: dict[str, list[SkippedSample]], count: int, total: int, limit: int) -> str:
    listed = [s for split in skipped.values() for s in split]
    shown = "; ".join(f"{s.path or s.key}: {s.reason}" for s in listed[:10])
    more = f"; and {len(listed) - 10} more" if len(listed) > 10 else ""
    return (f"{shown}{more} -- {count} of {total} images could not be read, more than data.max_corrupt_fraction "
            f"allows ({limit}); fix or remove them, or raise data.max_corrupt_fraction to skip them")


def _remove_stale_shards(target: OutputTarget, split: str, keep: int) -> None:
    """Delete shards of `split` left by an earlier, larger run, so the folder matches the manifest."""
    pattern = re.compile(rf"^{re.escape(split)}-(\d{{6}})\.tar$")
    for name in target.list():
        match = pattern.match(name)
        if match and int(match.group(1)) >= keep:
            target.delete(name)
