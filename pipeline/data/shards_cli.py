"""`vitpipe shards verify|info <manifest>` and `vitpipe bench data <manifest>`.

<manifest> is a local manifest.json or its folder, or a URL: ``s3://bucket/prefix[/manifest.json]``
or ``http(s)://host/path[/manifest.json]`` (S3 credentials, region and endpoint from the usual AWS_*
variables, AWS_ENDPOINT_URL included). Shards are read beside the manifest, through the same
`stream.open_url` the training stream uses, and streamed: one sample is held in memory at a time.
(`pretrain.shard_base_url` moves where *training* reads shards from; these commands always check
the shards beside the manifest.)

verify re-reads every shard and reports *every* problem it finds (missing or resized shard, sha256,
unreadable or truncated tar, a sample without an image or a .cls label, a label out of range, an
image that does not decode, a duplicate key, a count that disagrees with the manifest), each named
by shard and sample key; exit status 1 if there is any. A shard the server does not have (HTTP 404,
S3 NoSuchKey) is reported as "shard is missing". info prints a summary.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.data.manifest import IMAGE_SUFFIXES, DataError, Manifest, is_url, load_manifest
from pipeline.progress import Progress


@dataclass
class ShardScan:
    """What one pass over a shard found."""

    name: str
    samples: int = 0
    bytes: int = 0
    labels: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class _CountingReader:
    """Reads a shard's stream for tarfile while counting, and optionally hashing, every byte."""

    def __init__(self, raw, hash_bytes: bool):
        self.raw, self.nbytes = raw, 0
        self.sha = hashlib.sha256() if hash_bytes else None

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.nbytes += len(data)
        if self.sha is not None:
            self.sha.update(data)
        return data

    def drain(self) -> None:
        """Read to the end: tarfile stops at the end-of-archive blocks, before the record padding."""
        while self.read(_CHUNK):
            pass


_CHUNK = 1 << 20


def _open_shard(location: str):
    """(stream, None) for a readable shard, or (None, problem) when it is missing or cannot be opened."""
    from pipeline.data.storage import MissingObject, url_size
    from pipeline.data.stream import open_url  # imports torch; only the commands here need it

    if not is_url(location) and not Path(location).is_file():
        return None, "shard is missing"
    try:
        return open_url(location), None
    except DataError as e:
        if is_url(location):
            try:
                url_size(location)  # tells a missing object (404, NoSuchKey) from other failures
            except MissingObject:
                return None, "shard is missing"
            except DataError:
                pass
        return None, str(e).removeprefix(f"{location}: ")  # "cannot open (<why>)"


def _check_sample(scan: ShardScan, manifest: Manifest, key: str, parts: dict[str, bytes], decode: bool) -> list[str]:
    """Problems of one sample (image, label, decoding); counts its label and image size into `scan`."""
    where, problems = scan.name, []
    image_ext = next((s for s in IMAGE_SUFFIXES if s in parts), None)
    if image_ext is None:
        problems.append(f"{where}: sample {key!r}: no image (.png or .jpg); it has {sorted(parts)}")
    if "cls" not in parts:
        problems.append(f"{where}: sample {key!r}: no .cls label")
    else:
        try:
            label = int(parts["cls"].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            problems.append(f"{where}: sample {key!r}: .cls is not an integer: {parts['cls'][:20]!r}")
        else:
            if not 0 <= label < manifest.num_classes:
                problems.append(f"{where}: sample {key!r}: label {label} outside 0..{manifest.num_classes - 1}")
            scan.labels[label] += 1
    if image_ext is not None:
        try:
            with Image.open(io.BytesIO(parts[image_ext])) as im:
                scan.sizes[im.size] += 1
                if decode:
                    im.load()
        except Image.DecompressionBombError as e:  # refused before any pixel is decoded
            problems.append(f"{where}: sample {key!r}: .{image_ext} is a decompression bomb ({e})")
        except (OSError, SyntaxError, ValueError) as e:
            problems.append(f"{where}: sample {key!r}: .{image_ext} does not decode ({e})")
    return problems


def _scan_members(reader: _CountingReader, manifest: Manifest, scan: ShardScan, decode: bool) -> list[str]:
    """Stream the tar through `reader`, checking each sample as its members end; returns the problems.

    Only one sample's members are held at a time, so a shard of any size streams in little memory.
    Distinct sample keys go to `scan.keys`, in shard order.
    """
    from webdataset.tariterators import base_plus_ext  # the loader's grouping rule; imports torch

    where, problems = scan.name, []
    key, parts = None, {}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                name_key, suffix = base_plus_ext(member.name)
                if name_key is None:
                    problems.append(f"{where}: member {member.name!r} has no extension")
                    continue
                payload = tar.extractfile(member).read()
                if len(payload) != member.size:
                    problems.append(f"{where}: sample {name_key!r}: member {member.name!r} is truncated")
                if name_key != key:
                    if key is not None:
                        problems += _check_sample(scan, manifest, key, parts, decode)
                    if name_key in seen:  # webdataset would start a second sample with this key
                        problems.append(f"{where}: sample {name_key!r}: members are not contiguous (duplicate key)")
                    else:
                        seen.add(name_key)
                        scan.keys.append(name_key)
                    key, parts = name_key, {}
                parts[suffix.lower()] = payload
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{where}: not a readable tar after {len(scan.keys)} sample(s) ({e})")
    except Exception as e:  # a remote stream that breaks off (botocore/urllib3 errors are not OSErrors)
        problems.append(f"{where}: reading failed after {len(scan.keys)} sample(s) ({type(e).__name__}: {e})")
    if key is not None:
        problems += _check_sample(scan, manifest, key, parts, decode)
    return problems


def scan_shard(manifest: Manifest, record: dict, check_hash: bool = True, decode: bool = True) -> ShardScan:
    """Stream one shard of `manifest` (a local file or a URL) and check it against its `record`.

    Problems are collected, not raised: a missing shard, its size and sha256, then every sample's.
    """
    name = record["name"]
    scan = ShardScan(name)
    stream, problem = _open_shard(manifest.shard_location(name))
    if stream is None:
        scan.problems.append(f"{name}: {problem}")
        return scan
    reader = _CountingReader(stream, hash_bytes=check_hash)
    try:
        sample_problems = _scan_members(reader, manifest, scan, decode)
        try:
            reader.drain()  # the rest of the file counts toward its size and sha256
        except Exception as e:
            sample_problems.append(f"{name}: reading failed after {reader.nbytes} bytes ({type(e).__name__}: {e})")
    finally:
        stream.close()
    scan.bytes = reader.nbytes
    if reader.nbytes != record["bytes"]:
        scan.problems.append(f"{name}: size is {reader.nbytes} bytes but the manifest records {record['bytes']}")
    if reader.sha is not None and (digest := reader.sha.hexdigest()) != record["sha256"]:
        scan.problems.append(f"{name}: sha256 is {digest[:16]}... but the manifest records {record['sha256'][:16]}...")
    scan.problems += sample_problems
    scan.samples = len(scan.keys)
    if scan.samples != record["samples"]:
        scan.problems.append(f"{name}: holds {scan.samples} samples but the manifest records {record['samples']}")
    return scan


def scan_dataset(manifest: Manifest, check_hash: bool = True, decode: bool = True) -> dict[str, list[ShardScan]]:
    """`scan_shard` for every shard of every split, plus a check that keys are unique across the dataset."""
    scans: dict[str, list[ShardScan]] = {split: [] for split in manifest.splits}
    with Progress("[verify] shards", sum(len(manifest.shards(s)) for s in scans), "shards") as progress:
        for split, shard_scans in scans.items():
            for record in manifest.shards(split):
                shard_scans.append(scan_shard(manifest, record, check_hash, decode))
                progress.update()
    seen: dict[str, str] = {}
    for shard_scans in scans.values():
        for scan in shard_scans:
            for key in scan.keys:
                if key in seen and seen[key] != scan.name:
                    scan.problems.append(f"{scan.name}: sample {key!r}: key also in {seen[key]}")
                seen.setdefault(key, scan.name)
    return scans


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _print_summary(manifest: Manifest, scans: dict[str, list[ShardScan]]) -> None:
    print(f"manifest {manifest.path}")
    print(f"  source {manifest.source}, format {manifest.image_format}, channels {manifest.channels}, "
          f"image_size {manifest.image_size or 'mixed'}")
    for split, shard_scans in scans.items():
        samples = sum(s.samples for s in shard_scans)
        nbytes = sum(s.bytes for s in shard_scans)
        counts = [s.samples for s in shard_scans]
        spread = f", {min(counts)}..{max(counts)} per shard" if counts else ""
        print(f"  {split}: {samples} samples in {len(shard_scans)} shards, {_mb(nbytes)}{spread}")
    all_scans = [s for ss in scans.values() for s in ss]
    print(f"  total: {sum(s.samples for s in all_scans)} samples, {len(all_scans)} shards, "
          f"{_mb(sum(s.bytes for s in all_scans))}")
    sizes = sum((s.sizes for s in all_scans), Counter())
    if sizes:
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(5))
        print(f"  image sizes (WxH): {len(sizes)} distinct; most common {common}")
    labels = sum((s.labels for s in all_scans), Counter())
    print(f"  classes: {manifest.num_classes}")
    for index, name in enumerate(manifest.class_names):
        per_split = ", ".join(f"{split} {sum(s.labels[index] for s in ss)}" for split, ss in scans.items())
        print(f"    {index:>4} {name}: {labels[index]} ({per_split})")


def run_shards(args: argparse.Namespace) -> int:
    """`vitpipe shards verify|info`: returns the exit status (1 when verify finds a problem)."""
    manifest = load_manifest(args.manifest)
    verify = args.shards_command == "verify"
    scans = scan_dataset(manifest, check_hash=verify, decode=verify)
    problems = [p for ss in scans.values() for s in ss for p in s.problems]
    if verify and problems:
        for p in problems:
            print(f"FAIL {p}")
        bad = sorted({s.name for ss in scans.values() for s in ss if s.problems})
        print(f"vitpipe shards verify: {len(problems)} problem(s) in {len(bad)} shard(s): {', '.join(bad)}")
        return 1
    if getattr(args, "json", False):
        print(json.dumps({split: [{"name": s.name, "samples": s.samples, "bytes": s.bytes} for s in ss]
                          for split, ss in scans.items()}, indent=2))
    else:
        _print_summary(manifest, scans)
    if verify:
        total = sum(s.samples for ss in scans.values() for s in ss)
        print(f"OK: every shard matches its size and sha256; {total} samples, each image decoded and labelled")
    elif problems:
        print(f"note: {len(problems)} problem(s) seen; run `vitpipe shards verify {args.manifest}` for details")
    return 0


# a string, not a Path: Path() would turn s3://bucket into s3:/bucket
MANIFEST_HELP = "manifest.json or the folder holding it, or an s3://... or http(s)://... URL of either"


def add_shards_parser(subparsers) -> None:
    """Add `shards verify <manifest>` and `shards info <manifest>` to the CLI's subparsers."""
    p = subparsers.add_parser("shards", help="check or summarize prepared shards",
                              description="Check (verify) or summarize (info) the shards a manifest lists.")
    sub = p.add_subparsers(dest="shards_command", required=True, metavar="action")
    v = sub.add_parser("verify", help="re-read every shard: size, sha256, counts, labels, decode every image",
                       description="Re-read every shard of <manifest>; check its size and sha256, that each sample "
                       "has one image and an integer .cls in range, that every image decodes, and the sample "
                       "counts. Prints every problem with shard and key; exit status 1 if there is any.")
    v.add_argument("manifest", help=MANIFEST_HELP)
    i = sub.add_parser("info", help="summary: splits, shards, samples, bytes, classes, image sizes",
                       description="Summarize <manifest>: per split samples, shards and bytes; image sizes; "
                       "per-class counts (read from the shards' .cls members).")
    i.add_argument("manifest", help=MANIFEST_HELP)
    i.add_argument("--json", action="store_true", help="print per-shard counts as JSON instead")


def add_bench_data_parser(bench_sub) -> None:
    """Add `data <manifest>` to the `vitpipe bench` subcommands."""
    d = bench_sub.add_parser("data", help="shard loader vs decode ceiling vs folder of files, locally and over HTTP",
                       description="In one run: decoded+augmented images/s of the shard loader (per worker "
                       "count), the decode+augment ceiling (images already in memory), a folder of files, and "
                       "both over HTTP from a loopback server (shards streamed vs one request per image). "
                       "Prints ratios against the baselines and writes a JSON result.")
    d.add_argument("manifest", type=Path, help="manifest.json or the folder holding it")
    d.add_argument("--max-images", type=int, default=2000, help="images per measurement (default 2000)")
    d.add_argument("--workers", default="1,2", help="loader worker counts to measure (default 1,2)")
    d.add_argument("--image-size", type=int, default=None, help="output side of the transform (default: stored size)")
    d.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    d.add_argument("--repeats", type=int, default=3, help="rounds of every measurement; the best is kept (default 3)")
    d.add_argument("--out", type=Path, default=Path("bench_data.json"), help="JSON result (default bench_data.json)")


def run_bench_data(args: argparse.Namespace) -> int:
    """`vitpipe bench data`: run the benchmark, print the table, write the JSON."""
    from pipeline.data.bench import BenchSettings, bench_data, format_table

    try:
        workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    except ValueError:
        raise DataError(f"--workers: expected a comma-separated list of ints, got {args.workers!r}") from None
    settings = BenchSettings(max_images=args.max_images, workers=workers, image_size=args.image_size,
                             batch=args.batch, repeats=args.repeats)
    result = bench_data(args.manifest, settings)
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
