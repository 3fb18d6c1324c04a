"""Stage 5, benchmark: onnxruntime latency and throughput, PyTorch eager measured in the same run.

Reads: model.onnx (+ model.onnx.json beside it), and the weights pair for the PyTorch baseline.
Writes: <out>/bench.json (per runtime and batch size: latency p50/p90/p99, images/s, the providers
that really ran, the environment) and prints the table.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.config import BenchmarkConfig
from pipeline.export.benchmark import benchmark_onnx, benchmark_torch, compare, environment, format_table
from pipeline.model.weights import check_model_classes, model_from_pair
from pipeline.track import NullTracker, Tracker
from stages import record
from stages.lineage import content_sha256


def run(bench: BenchmarkConfig, onnx_path: str | Path, weights: str | Path, out_dir: str | Path,
        tracker: Tracker | None = None, force: bool = False) -> dict:
    """Benchmark `onnx_path` against PyTorch eager on `weights`; return what bench.json holds."""
    tracker = tracker or NullTracker()
    out_dir, onnx_path, weights = Path(out_dir), Path(onnx_path), Path(weights)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX model not found; run the export stage first")
    if (exported := onnx_path.with_name(onnx_path.name + ".json")).is_file():  # the ONNX model's classes
        info = json.loads(exported.read_text())
        check_model_classes(weights, info.get("class_names"), str(onnx_path), num_classes=info["output"]["shape"][1])
    cfg = dataclasses.asdict(bench)
    fp = record.fingerprint("benchmark", cfg, [onnx_path, weights])
    if not force and (done := record.completed(out_dir, fp)):
        print(f"[benchmark] up to date: {out_dir / 'bench.json'}")
        return done
    record.begin(out_dir, fp)
    tracker.log_params({"benchmark": cfg})
    model, meta = model_from_pair(weights)
    model.eval()
    h, w = meta["image_size"]
    in_ch = meta["architecture"]["in_channels"]
    common = dict(image_size=(h, w), in_channels=in_ch, warmup=bench.warmup, iterations=bench.iterations,
                  threads=bench.threads)
    torch_rows = benchmark_torch(model, bench.batch_sizes, **common)
    ort_rows = benchmark_onnx(onnx_path, bench.batch_sizes, providers=bench.providers, **common)
    rows = compare(ort_rows, torch_rows)
    providers = ort_rows[0]["providers"] if ort_rows else []
    result = {"onnx": str(onnx_path), "rows": rows, "onnxruntime": ort_rows, "torch": torch_rows,
              "providers": providers, "environment": environment(bench.threads), "config": cfg}
    for r in rows:
        tracker.log_metrics({f"ort_images_per_s_b{r['batch_size']}": r["ort_images_per_s"],
                             f"torch_images_per_s_b{r['batch_size']}": r["torch_images_per_s"],
                             f"ort_p50_ms_b{r['batch_size']}": r["ort_p50_ms"],
                             f"speedup_b{r['batch_size']}": r["speedup"]})
    path = out_dir / "bench.json"
    write_json(path, result)
    tracker.log_artifact(path)
    tracker.log_lineage(inputs={"onnx": content_sha256(onnx_path), "weights": content_sha256(weights)})
    record.finish(out_dir, "benchmark", fp, [path], result)
    print(f"[benchmark] onnxruntime providers used: {', '.join(providers)}")
    print(format_table(rows))
    return result
