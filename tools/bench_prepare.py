"""`vitpipe bench prepare`: how prepare's throughput grows with worker processes, in one run.

The same synthetic dataset (seeded images of one size, rendered inside the workers, so reading the
source costs nothing) is prepared with each worker count, `repeats` rounds interleaved, best round
kept. Reported per count: images/s end to end (pool start-up, encode pass, shard-writing pass,
manifest), the speed-up over 1 worker, the pool's start-up (spawned processes importing the shard
writer, measured on its own) and the speed-up without it, which is what a dataset of millions of
images sees; and the baseline: the per-image work alone (render + encode) in N already-started
processes at once, i.e. what this machine's cores deliver in parallel. Every run's manifest must list the same shard hashes: more workers may only make
prepare faster, never change its output.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline.atomic import write_text
from pipeline.config import DataConfig
from pipeline.data.errors import DataError
from pipeline.data.manifest import load_manifest
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import default_workers
from pipeline.tables import format_table


def _ready(_: int) -> bool:
    """Pool task: the worker has started and imported what prepare's tasks need."""
    import pipeline.data.shards  # noqa: F401

    return True


def _pool_startup(workers: int) -> float:
    """Seconds to start a pool of `workers` processes as prepare does (spawn) and have each import the
    shard writer: the fixed cost that large datasets amortize (0 for 1 worker: it runs in process)."""
    if workers < 2:
        return 0.0
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_ready, range(workers)))
    return time.perf_counter() - start


def _encode_images(task: tuple[int, int, int, int, str]) -> int:
    """Pool task: render and encode images [start, stop) of the synthetic set, as prepare's workers do."""
    from pipeline.data.shards import EncodeOptions, store_image
    from pipeline.data.sources import Sample, SyntheticImage

    start, stop, height, width, image_format = task
    options = EncodeOptions(image_format)
    for i in range(start, stop):
        store_image(Sample(key=f"s{i}", label=0, synthetic=SyntheticImage(0, i, height, width)), options)
    return stop - start


def _compute_ceiling(count: int, size: tuple[int, int], image_format: str, workers: int) -> float:
    """Images/s of prepare's per-image work alone (render + encode, no I/O, no planning) in `workers`
    processes at once, already started: what this machine's cores can do in parallel. On shared
    cloud VMs a second busy core often runs slower than a lone one, so this is the fair bar for
    "linear in workers", not `workers` x one process."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    bounds = [(count * i // workers, count * (i + 1) // workers) for i in range(workers)]
    tasks = [(a, b, size[0], size[1], image_format) for a, b in bounds]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_encode_images, [(0, 2, size[0], size[1], image_format)] * workers))  # start + import
        start = time.perf_counter()
        done = sum(pool.map(_encode_images, tasks))
        return done / (time.perf_counter() - start)


def _prepare_once(cfg: DataConfig, workers: int) -> tuple[float, list[str]]:
    """Seconds to prepare `cfg` with `workers`, and the shard hashes it wrote."""
    with tempfile.TemporaryDirectory(prefix="vitpipe-bench-prepare-") as out:
        start = time.perf_counter()
        path = prepare_dataset(DataConfig(**{**cfg.__dict__, "workers": workers}), out)
        seconds = time.perf_counter() - start
        manifest = load_manifest(path)
        hashes = [s["sha256"] for split in sorted(manifest.splits) for s in manifest.shards(split)]
    return seconds, hashes


def bench_prepare(count: int, size: tuple[int, int], image_format: str, workers: list[int],
                  shard_max_samples: int = 250, repeats: int = 2) -> dict:
    """Prepare the same synthetic dataset with each worker count; the JSON-ready result."""
    if count < 1 or min(size) < 1:
        raise DataError(f"--count {count} / --size {size}: need at least one image of at least 1x1 pixels")
    if not workers or min(workers) < 1:
        raise DataError(f"--workers {workers}: need one or more counts >= 1")
    cfg = DataConfig(source="synthetic", synthetic_count=count, synthetic_size=list(size), image_format=image_format,
                     shard_max_samples=shard_max_samples)
    rounds: dict[int, list[float]] = {w: [] for w in workers}
    startup: dict[int, list[float]] = {w: [] for w in workers}
    ceiling: dict[int, list[float]] = {w: [] for w in workers}
    reference: list[str] | None = None
    for _ in range(max(1, repeats)):
        for w in workers:
            startup[w].append(_pool_startup(w))
            ceiling[w].append(_compute_ceiling(count, size, image_format, w))
            seconds, hashes = _prepare_once(cfg, w)
            if reference is None:
                reference = hashes
            elif hashes != reference:
                raise DataError(f"prepare with {w} worker(s) wrote different shards than with {workers[0]}: "
                                "the output must not depend on the worker count")
            rounds[w].append(seconds)
    cores = default_workers()
    base = min(rounds[min(workers)])
    runs = []
    for w in workers:
        best, start = min(rounds[w]), min(startup[w])
        runs.append({
            "workers": w, "seconds": round(best, 3), "images_per_s": round(count / best, 1),
            "rounds_seconds": [round(s, 3) for s in rounds[w]],
            "speedup_vs_min_workers": round(base / best, 3),
            "pool_startup_s": round(start, 3),
            # what a dataset large enough to amortize the pool's start-up would see
            "steady_speedup_vs_min_workers": round((base - min(startup[min(workers)])) / max(best - start, 1e-9), 3),
            "ideal_speedup": min(w, cores) / min(min(workers), cores),
            "compute_ceiling_images_per_s": round(max(ceiling[w]), 1),
            "vs_compute_ceiling": round(count / best / max(ceiling[w]), 3),
        })
    return {
        "benchmark": "vitpipe bench prepare",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cores": cores,
        "settings": {"count": count, "size": list(size), "image_format": image_format, "workers": workers,
                     "shard_max_samples": shard_max_samples, "repeats": repeats},
        "byte_identical_across_workers": True,
        "runs": runs,
    }


def report(result: dict) -> str:
    """The result as a plain-text table."""
    s = result["settings"]
    lines = [f"vitpipe bench prepare: {s['count']} synthetic {s['size'][0]}x{s['size'][1]} {s['image_format']} images, "
             f"best of {s['repeats']} round(s), {result['cores']} core(s)",
             format_table([{"workers": r["workers"], "seconds": round(r["seconds"], 2),
                            "images/s": round(r["images_per_s"]),
                            "speed-up (x)": round(r["speedup_vs_min_workers"], 2),
                            "pool start (s)": round(r["pool_startup_s"], 2),
                            "without start-up (x)": round(r["steady_speedup_vs_min_workers"], 2),
                            "encode-only, N processes (img/s)": round(r["compute_ceiling_images_per_s"]),
                            "prepare vs that (x)": round(r["vs_compute_ceiling"], 2)} for r in result["runs"]])]
    base = result["runs"][0]
    for r in result["runs"][1:]:
        lines.append(f"encode-only scaling on this machine, {base['workers']} -> {r['workers']} processes: "
                     f"{r['compute_ceiling_images_per_s'] / base['compute_ceiling_images_per_s']:.2f} x "
                     f"(ideal {r['ideal_speedup']:.0f} x)")
    lines.append("shards byte-identical for every worker count: yes")
    return "\n".join(lines)


def add_bench_prepare_parser(bench_sub) -> None:
    """Register `vitpipe bench prepare`."""
    p = bench_sub.add_parser("prepare", help="prepare throughput vs worker processes (synthetic images)",
                             description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="images (default 2000)")
    p.add_argument("--size", default="224,224", help="height,width of every image (default 224,224)")
    p.add_argument("--format", dest="image_format", choices=["jpg", "png"], default="jpg", help="stored format")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1 and all cores)")
    p.add_argument("--shard-max-samples", type=int, default=250, help="samples per shard (default 250)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is kept (default 2)")
    p.add_argument("--out", type=Path, default=Path("bench_prepare.json"), help="JSON result")


def run_bench_prepare(args: argparse.Namespace) -> int:
    """`vitpipe bench prepare`: run, print the table, write the JSON."""
    try:
        size = tuple(int(v) for v in str(args.size).split(","))
        workers = ([int(w) for w in str(args.workers).split(",") if w.strip()] if args.workers
                   else sorted({1, default_workers()}))
    except ValueError:
        raise DataError(f"--size {args.size!r} / --workers {args.workers!r}: expected comma-separated integers") from None
    if len(size) != 2:
        raise DataError(f"--size {args.size!r}: expected height,width")
    result = bench_prepare(args.count, size, args.image_format, workers, args.shard_max_samples, args.repeats)
    print(report(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
