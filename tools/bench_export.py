"""`vitpipe bench export`: each export variant under onnxruntime against PyTorch eager, in one run.

One model (default ViT-S/16 at 224 px, random weights: timing does not depend on them), one
seeded input per batch size (`benchmark.bench_input`), and these candidates, measured in
interleaved rounds (every candidate once per round, so a burst of load on the shared machine hits
all of them alike); each candidate's figure is its best round's median, and the ratio is the faster eager row's
best round over the candidate's:

  eager          PyTorch eager fp32, inference_mode, on the same threads (the baseline), and on one thread
                 (under load it can be the faster: see `_eager_runners`)
  fp32           our torch.onnx.export graph, no fusions (the unoptimized export)
  optimum        the same export passed through onnxruntime.transformers.optimizer (model_type vit):
                 what Optimum's ORTOptimizer and timm's ONNX route do
  optimized      our fused graph (pipeline/export/graph.py)
  int8_dynamic   the fused graph, dynamic int8
  int8_static    the fused graph, static int8 (calibrated on random inputs here: timing only)
  fp16           the fused graph in fp16, when this CPU's onnxruntime runs it

Rows of case "as_is" run on the machine as it is (on a shared one, whatever else runs there);
case "busy" adds a load of the benchmark's own. Busy machine (--busy-seconds > 0): the benchmark starts one CPU-burning process per core
(bounded: each exits by itself after --busy-seconds), measures at batch 1 eager, the fused graph
with onnxruntime's default thread pool (spinning on) and with ours (`session_options`: spinning
off), and int8_dynamic with ours, then stops the load.

Accuracy (--weights and --manifest): the variants of a trained model, each one's top-1 on the
held-out split against PyTorch fp32 (what the export stage's max_accuracy_drop gate checks).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.atomic import write_json
from pipeline.config import ModelConfig
from pipeline.export.benchmark import _time_runs, bench_input, environment
from pipeline.tables import format_table
from pipeline.export.graph import fusions, op_counts
from pipeline.export.onnx_export import INPUT_NAME, OUTPUT_NAME, ort_session, physical_cores, torch_logits
from pipeline.export.variants import labelled_images, measure_variant, preprocessing_metadata, write_variants
from pipeline.model.variants import decode_variant
from pipeline.model.vit import build_model

CPU = ["CPUExecutionProvider"]
BUSY_LOOP = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def optimum_way(fp32_path: Path, out: Path, heads: int, width: int) -> Path:
    """torch.onnx.export + onnxruntime.transformers.optimizer (model_type vit), as Optimum/timm users do."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(fp32_path), model_type="vit", num_heads=heads, hidden_size=width, opt_level=1)
    optimized.save_model_to_file(str(out))
    return out


@contextlib.contextmanager
def competing_load(processes: int, seconds: float):
    """`processes` CPU-burning Python processes for the duration (each also exits by itself after `seconds`)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(seconds)]) for _ in range(processes)]
    try:
        time.sleep(0.5)  # let them reach the busy loop
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, iterations: int, warmup: int = 1) -> dict:
    """Per candidate: the median ms of each round (every candidate once per round, in turn), and the best round."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    per_round: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            per_round[name].append(float(np.median(_time_runs(fn, 0, iterations))))
    return {name: {"best_ms": min(v), "rounds_ms": v} for name, v in per_round.items()}


def _eager_runners(model, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Eager at the session's thread count, and (on a multi-core run) on one thread.

    On a loaded machine PyTorch's OpenMP barriers can stall a multi-threaded forward by orders of
    magnitude (measured here: ViT-Ti/4 at 32 px, 2440 ms on 2 threads vs 63 ms on 1 under load 10),
    so the ratios are taken against the faster of the two: a baseline that is not set up to lose.
    """
    runners: dict[str, Callable[[], Any]] = {"eager": lambda: model(x)}
    threads = torch.get_num_threads()
    if threads > 1:
        def one_thread() -> None:
            torch.set_num_threads(1)
            try:
                model(x)
            finally:
                torch.set_num_threads(threads)

        runners["eager[1 thread]"] = one_thread
    return runners


def _rows(timings: dict, batch: int, case: str = "as_is") -> list[dict]:
    base = min(t["best_ms"] for name, t in timings.items() if name.startswith("eager"))
    return [{"case": case, "batch": batch, "candidate": name, "best_ms": t["best_ms"],
             "median_of_rounds_ms": float(np.median(t["rounds_ms"])), "images_per_s": batch * 1000.0 / t["best_ms"],
             "vs_best_eager": base / t["best_ms"]} for name, t in timings.items()]


def _session_runner(session, batch: int, in_channels: int, image_size: int) -> Callable[[], Any]:
    feed = {INPUT_NAME: bench_input(batch, in_channels, image_size).numpy()}
    return lambda: session.run([OUTPUT_NAME], feed)


def bench_export(variant: str = "vit-s16", image_size: int = 224, batch_sizes=(1, 32), rounds: int = 5,
                 iterations: int = 4, threads: int = 0, busy_seconds: float = 300.0, num_classes: int = 1000,
                 weights: Path | None = None, manifest: str | None = None, workdir: Path | None = None,
                 depth: int | None = None) -> dict:
    """Run the comparison; return the rows, the skipped candidates with reasons, fusions and the environment."""
    cfg = ModelConfig(**{**decode_variant(variant), **({"depth": depth} if depth else {})})
    torch.manual_seed(0)
    model = build_model(cfg, image_size, num_classes).eval()
    c = cfg.in_channels
    with contextlib.ExitStack() as stack:
        out = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vitpipe-bench-export.")))
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        calibration = bench_input(16, c, image_size).numpy()
        meta = {"variant_of": variant, "random_weights": True}
        paths = write_variants(model, ["fp32", "optimized", "fp16", "int8_dynamic", "int8_static"], out,
                               opset=18, metadata=meta, calibration=calibration)
        paths["optimum"] = optimum_way(paths["fp32"], out / "model.optimum.onnx", cfg.heads, cfg.width)
        export_s = time.perf_counter() - t0
        import onnx

        graphs = {name: {"fusions": fusions(onnx.load(str(p))), "nodes": sum(op_counts(onnx.load(str(p))).values())}
                  for name, p in paths.items()}
        sessions, skipped = {}, {}
        for name in ("fp32", "optimum", "optimized", "int8_dynamic", "int8_static", "fp16"):
            try:
                sessions[name] = ort_session(paths[name], CPU, threads)[0]
            except RuntimeError as e:  # fp16 kernels missing from this CPU build, for one
                skipped[name] = str(e).splitlines()[0][:300]
        previous = torch.get_num_threads()
        if threads > 0:
            torch.set_num_threads(threads)
        rows: list[dict] = []
        try:
            with torch.inference_mode():
                for b in batch_sizes:
                    x = bench_input(b, c, image_size)
                    cands: dict[str, Callable[[], Any]] = _eager_runners(model, x)
                    cands.update({n: _session_runner(s, b, c, image_size) for n, s in sessions.items()})
                    iters = max(1, iterations // b)
                    rows += _rows(interleaved(cands, rounds, iters), b)
                    print(format_table([r for r in rows if r["batch"] == b]), flush=True)
                if busy_seconds > 0:
                    x1 = bench_input(1, c, image_size)
                    busy = {**_eager_runners(model, x1),
                            "optimized[ort defaults: spinning on]": _session_runner(
                                ort_session(paths["optimized"], CPU, threads, spinning=True)[0], 1, c, image_size),
                            "optimized[ours: spinning off]": _session_runner(sessions["optimized"], 1, c, image_size),
                            "int8_dynamic[ours: spinning off]": _session_runner(sessions["int8_dynamic"], 1, c, image_size)}
                    with competing_load(physical_cores(), busy_seconds):
                        t_busy = time.perf_counter()
                        busy_rows = _rows(interleaved(busy, rounds, max(1, iterations // 2)), 1, case="busy")
                        busy_rows_s = time.perf_counter() - t_busy
                    rows += busy_rows
                    print(format_table(busy_rows), flush=True)
        finally:
            torch.set_num_threads(previous)
        accuracy = _accuracy(weights, manifest, out) if weights is not None else None
    result = {"model": {"variant": variant, "depth": cfg.depth, "image_size": image_size, "num_classes": num_classes},
              "rounds": rounds, "iterations_per_round": {b: max(1, iterations // b) for b in batch_sizes},
              "rows": rows, "skipped": skipped, "graphs": graphs, "export_seconds": export_s,
              "threads": threads or physical_cores(), "environment": environment(threads)}
    if busy_seconds > 0:
        # The load's own time limit is a safety net; past it the busy rows were partly measured unloaded.
        result["busy"] = {"processes": physical_cores(), "seconds_limit": busy_seconds,
                          "seconds_measured": busy_rows_s, "load_ended_early": busy_rows_s > busy_seconds}
        if busy_rows_s > busy_seconds:
            print(f"warning: the busy rows took {busy_rows_s:.0f} s, past the load's {busy_seconds:.0f} s limit: "
                  "rerun with a larger --busy-seconds", file=sys.stderr)
    if accuracy is not None:
        result["accuracy"] = accuracy
    return result


def _accuracy(weights: Path, manifest: str | None, out: Path) -> dict:
    """Held-out top-1 of every variant of the trained model at `weights` against PyTorch fp32 on `manifest`'s val split."""
    from pipeline.model.weights import model_from_pair

    if manifest is None:
        raise ValueError("--weights needs --manifest (its val split is where accuracy is measured)")
    model, meta = model_from_pair(weights)
    model.eval()
    images, labels = labelled_images(manifest, "val", None, meta)
    calibration = labelled_images(manifest, "train", 64, meta)[0].numpy()
    acc_dir = out / "accuracy"
    acc_dir.mkdir(exist_ok=True)
    names = ["fp32", "optimized", "fp16", "int8_dynamic", "int8_static"]
    paths = write_variants(model, names, acc_dir, opset=18, metadata=preprocessing_metadata(meta, "", False),
                           calibration=calibration)
    ref = torch_logits(model, images)
    table = {}
    for name, path in paths.items():
        parity, accuracy, _ = measure_variant(path, ref, images, labels, len(images))
        table[name] = {**accuracy, "top1_agreement": parity["top1_agreement"], "max_abs_diff": parity["max_abs_diff"]}
    print(format_table([{"variant": n, **{k: v for k, v in t.items() if k != "n_images"}} for n, t in table.items()]))
    return {"weights": str(weights), "manifest": str(manifest), "n_images": int(len(images)), "variants": table}


def add_bench_export_parser(bench_sub) -> None:
    """Add `bench export` to the `vitpipe bench` subcommands."""
    p = bench_sub.add_parser("export", help="ONNX variants (fused, int8, fp16, Optimum way) vs PyTorch eager",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit-s16", help="model size, e.g. vit-s16 (random weights)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--depth", type=int, help="blocks (default: the variant's), for a quicker run")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each candidate's best round is kept")
    p.add_argument("--iterations", type=int, default=4, help="timed runs per round at batch 1 (divided by the batch)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: physical cores)")
    p.add_argument("--busy-seconds", type=float, default=300.0,
                   help="upper bound of the competing CPU load of the busy case (0: skip it)")
    p.add_argument("--weights", type=Path, help="a trained weights pair: also measure each variant's held-out top-1")
    p.add_argument("--manifest", help="manifest.json whose val split --weights is measured on")
    p.add_argument("--workdir", type=Path, help="keep the exported graphs here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=Path("bench_export.json"), help="JSON result")


def run_bench_export(args: argparse.Namespace) -> int:
    """`vitpipe bench export`: run, print the tables, write the JSON."""
    if args.rounds < 1 or args.iterations < 1 or any(b < 1 for b in args.batch_sizes):
        raise ValueError("bench export: --rounds, --iterations and --batch-sizes must be >= 1")
    result = bench_export(args.variant, args.image_size, tuple(args.batch_sizes), args.rounds, args.iterations,
                          args.threads, args.busy_seconds, weights=args.weights, manifest=args.manifest,
                          workdir=args.workdir, depth=args.depth)
    if result["skipped"]:
        for name, why in result["skipped"].items():
            print(f"not run: {name}: {why}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0
