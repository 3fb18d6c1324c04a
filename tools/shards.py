"""`vitpipe shards verify|info <manifest>` and `vitpipe bench data <manifest>`.

<manifest> is a local manifest.json or its folder, or a URL: ``s3://bucket/prefix[/manifest.json]``,
``http(s)://host/path[/manifest.json]`` or ``pipe:<command> <path>`` (S3 credentials, region and
endpoint from the usual AWS_* variables, AWS_ENDPOINT_URL included). Shards are read beside the
manifest, through the same `storage.open_url` and `shard_format.read_shard` (in its collecting
mode) the training stream uses, and streamed: one sample is held in memory at a time.
(`pretrain.shard_base_url` moves where *training* reads shards from; these commands always check
the shards beside the manifest.)

verify re-reads every shard and reports *every* problem it finds (missing or resized shard, sha256,
unreadable or truncated tar, a sample without an image or a .cls label, a label out of range, an
image that does not decode or is a decompression bomb, a duplicate key, a link, an absolute or
'..' member name, an empty member, a count that disagrees with the manifest), each named by shard
and sample key; exit status 1 if there is any. A shard the server does not have (HTTP 404,
S3 NoSuchKey) is reported as "shard is missing". info prints a summary.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import write_text
from pipeline.data.errors import DataError, MissingObject
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.shard_format import ImageRefused, decode_image, image_size, read_shard
from pipeline.data.storage import is_url, object_size, open_url
from pipeline.progress import Progress
from tools.bench_data import BenchSettings, bench_data, report


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


def _open_shard(location: str):
    """(stream, None) for a readable shard, or (None, problem) when it is missing or cannot be opened."""
    try:
        return open_url(location), None
    except MissingObject:
        return None, "shard is missing"
    except DataError as e:
        if is_url(location):
            try:
                object_size(location)  # tells a missing object (404, NoSuchKey) from other failures
            except MissingObject:
                return None, "shard is missing"
            except DataError:
                pass
        return None, str(e).removeprefix(f"{location}: ")


def scan_shard(manifest: Manifest, record: dict, check_hash: bool = True, decode: bool = True) -> ShardScan:
    """Stream one shard of `manifest` (a local file or a URL) and check it against its `record`.

    Problems are collected, not raised: a missing shard, its size and sha256, then every sample's
    (by `shard_format.read_shard` in collect mode) and every image's that does not decode.
    """
    name = record["name"]
    scan = ShardScan(name)
    stream, problem = _open_shard(manifest.shard_location(name))
    if stream is None:
        scan.problems.append(f"{name}: {problem}")
        return scan
    counted = _Counting(stream)
    problems: list[str] = []
    for sample in read_shard(counted, record, name, manifest.num_classes, problems=problems,
                             check_hash=check_hash, keys=scan.keys):
        scan.labels[sample.label] += 1
        try:
            scan.sizes[image_size(sample.image)] += 1
            if decode:
                decode_image(sample.image)
        except ImageRefused as e:
            problems.append(f"{name}: sample {sample.key!r}: .{sample.image_suffix} {e.reason}")
    scan.problems += problems
    scan.samples = len(scan.keys)
    scan.bytes = counted.nbytes
    return scan


class _Counting:
    """A shard's stream, counting the bytes read from it (the summary's sizes)."""

    def __init__(self, raw):
        self.raw, self.nbytes = raw, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.nbytes += len(data)
        return data

    def close(self) -> None:
        self.raw.close()


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
    try:
        workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    except ValueError:
        raise DataError(f"--workers: expected a comma-separated list of ints, got {args.workers!r}") from None
    settings = BenchSettings(max_images=args.max_images, workers=workers, image_size=args.image_size,
                             batch=args.batch, repeats=args.repeats)
    result = bench_data(args.manifest, settings)
    print(report(result))
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
