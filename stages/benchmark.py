"""Stage 5, benchmark: every ONNX variant on every provider asked for, PyTorch eager and torch.compile
on the same devices in the same run; then the exported model goes to the MLflow model registry.

Reads: the export folder (model.onnx + model.onnx.json, and any other .onnx variant beside it),
and the weights pair for the PyTorch baselines.
Writes: <out>/bench.json (per variant x provider x batch size: latency p50/p90/p99, images/s,
peak memory, the providers that really ran; the serving sweep; fallbacks; the environment) and
<out>/bench.png (latency and throughput against batch size, and the sweep), and prints the table.
Fails, before anything is timed, when a requested provider cannot run (unless
benchmark.allow_fallback) or an ONNX file does not fit the model (its input shape, or external
data outside its folder).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from pipeline.atomic import write_json
from pipeline.config import BenchmarkConfig
from pipeline.export.benchmark import (
    bench_input, compare, concurrency_sweep, environment, fallback_notices, measure, onnx_candidate,
    torch_candidate,
)
from pipeline.export.benchmark_plot import plot_benchmark
from pipeline.export.onnx_export import INPUT_NAME
from pipeline.export.onnx_file_checks import check_external_data, check_input_shape
from pipeline.export.providers import GPU_PROVIDERS, default_providers, onnxruntime_package
from pipeline.tables import format_table
from pipeline.model.weights import check_model_classes, model_from_pair, pair_paths
from pipeline.track import NullTracker, Tracker, model_requirements, register_onnx_model
from stages import record
from stages.lineage import content_sha256


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ONNX file to benchmark, by the name its rows carry."""

    name: str
    path: Path


def find_variants(onnx_path: str | Path | Sequence[str | Path], names: Sequence[str] | None = None) -> list[Variant]:
    """The ONNX files to benchmark: a list is taken as given; one path means it and every other .onnx
    file in its folder (the export's variants), it first. `names` (file stems) selects among them."""
    if isinstance(onnx_path, (str, Path)):
        first = Path(onnx_path)
        if not first.is_file():
            raise FileNotFoundError(f"{first}: ONNX model not found; run the export stage first")
        paths = [first] + sorted(p for p in first.parent.glob("*.onnx")
                                 if p.is_file() and not p.name.startswith(".") and p.resolve() != first.resolve())
    else:
        paths = [Path(p) for p in onnx_path]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: ONNX model not found")
    variants = [Variant(p.stem, p) for p in paths]
    if names is not None:
        known = {v.name: v for v in variants}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"benchmark.variants: {unknown} not found; the export has {sorted(known)}")
        variants = [known[n] for n in names]
    return variants


def trt_cache_dir(out_dir: Path) -> Path:
    """TensorRT's engine cache: beside the stage folder, which a rerun empties; TensorRT checks each
    cached engine against the model, the GPU and its own version before reusing it."""
    return out_dir.parent / "trt_cache"


def _parity_and_accuracy(onnx_path: Path, meta: dict) -> dict:
    """Figures for the registry tags: parity from model.onnx.json, top-1 accuracy of the variant when
    the export measured it, else the PyTorch model's val accuracy (which parity ties it to)."""
    sidecar = onnx_path.with_name(onnx_path.name + ".json")
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    parity = info.get("parity") or {}
    accuracy = info.get("accuracy")
    if accuracy is None:  # the export records each variant's held-out accuracy under its file name
        entry = next((v for v in (info.get("variants") or {}).values() if v.get("file") == onnx_path.name), None)
        accuracy = (entry or {}).get("accuracy")
    if isinstance(accuracy, dict):
        accuracy = accuracy.get("top1", accuracy.get("val_accuracy"))
    source = "export" if accuracy is not None else "weights"
    if accuracy is None:
        accuracy = meta.get("val_accuracy")
    return {"info": info, "parity_max_abs_diff": parity.get("max_abs_diff"),
            "parity_top1_agreement": parity.get("top1_agreement"), "accuracy": accuracy, "accuracy_source": source}


def _serving_metadata(info: dict, meta: dict) -> dict:
    """What a server needs to turn an image into the model's input, and logits into classes."""
    h, w = meta["image_size"]
    return {"input": {"name": INPUT_NAME, "shape": ["batch", meta["architecture"]["in_channels"], h, w],
                      "mean": meta["mean"], "std": meta["std"], "resize": "bicubic", "crop": "none"},
            "class_names": meta.get("class_names") or [str(i) for i in range(meta["num_classes"])],
            "num_classes": meta["num_classes"], "export": {k: info[k] for k in ("opset", "fusions") if k in info}}


def run(bench: BenchmarkConfig, onnx_path: str | Path | Sequence[str | Path], weights: str | Path,
        out_dir: str | Path, tracker: Tracker | None = None, force: bool = False,
        registered_model: str | None = None) -> dict:
    """Benchmark the variants against PyTorch on `weights`; register the first variant as
    `registered_model` when given and tracking is on; return what bench.json holds."""
    tracker = tracker or NullTracker()
    out_dir, weights = Path(out_dir), pair_paths(weights)[0]  # the pair's folder or .json: its .safetensors
    variants = find_variants(onnx_path, bench.variants)
    if (exported := variants[0].path.with_name(variants[0].path.name + ".json")).is_file():  # the ONNX model's classes
        info = json.loads(exported.read_text())
        check_model_classes(weights, info.get("class_names"), str(variants[0].path),
                            num_classes=info["output"]["shape"][1])
    model, meta = model_from_pair(weights)
    model.eval()
    h, w = meta["image_size"]
    in_ch = meta["architecture"]["in_channels"]
    # The exporter keeps weights over 2 GB in <name>.data beside the .onnx (onnx_export): part of its identity.
    data_files = [d for v in variants if (d := v.path.with_name(v.path.name + ".data")).is_file()]
    cfg = dataclasses.asdict(bench)
    fp = record.fingerprint("benchmark", {**cfg, "registered_model": registered_model},
                            [v.path for v in variants] + data_files + [weights])
    if not force and (done := record.completed(out_dir, fp)):  # no session opened: nothing read but hashes
        print(f"[benchmark] up to date: {(out_dir / 'bench.json').absolute()}")
        return done
    for v in variants:  # a hostile or mismatched file is refused before a session opens it, or old results go
        check_external_data(v.path)
        check_input_shape(v.path, INPUT_NAME, in_ch, (h, w))
    record.begin(out_dir, fp)
    tracker.log_params({"benchmark": cfg})

    requested = list(bench.providers) if bench.providers else default_providers()
    ort, rows, sweep = _time_candidates(bench, variants, model, requested, out_dir, in_channels=in_ch, image_size=(h, w))
    result = _result(bench, variants, ort, rows, sweep, requested)
    result["weights"] = str(weights)  # the PyTorch baselines' weights, which bench.json did not name
    _log_metrics(tracker, result["rows"])
    load = result["environment"]["load_avg_1m"]
    plot = plot_benchmark(result["onnxruntime"] + result["torch"], result["concurrency"], out_dir / "bench.png",
                          result["notices"], title=f"vitpipe benchmark: {', '.join(v.name for v in variants)} "
                          f"on {', '.join(result['providers'])} (load average {load:.1f} at the end)")
    result["plot"] = str(plot)
    if registered_model:
        result["registered"] = _register(tracker, variants[0].path, meta, result, registered_model, in_ch, (h, w))
    path = out_dir / "bench.json"
    write_json(path, result)
    tracker.log_artifact(path)
    tracker.log_artifact(plot)
    tracker.log_lineage(inputs={"onnx": content_sha256(variants[0].path), "weights": content_sha256(weights)})
    record.finish(out_dir, "benchmark", fp, [path, plot], result)
    print(f"[benchmark] onnxruntime providers used: {', '.join(result['providers'])}")
    print(bench_table(result))
    return result


def _time_candidates(bench: BenchmarkConfig, variants: list[Variant], model, requested: list[str], out_dir: Path,
                     **common) -> tuple[list, list[dict], list[dict]]:
    """Open a session per variant x provider (each provider checked, failing the stage before anything
    is timed), add the PyTorch baselines on the devices they run on, time them all, then the sweep."""
    ort = [onnx_candidate(v.name, v.path, p, batch_sizes=bench.batch_sizes, threads=bench.threads,
                          allow_fallback=bench.allow_fallback, io_binding=bench.io_binding,
                          cuda_graph=bench.cuda_graph, tensorrt_fp16=bench.tensorrt_fp16,
                          trt_cache=trt_cache_dir(out_dir) if p == "TensorrtExecutionProvider" else None, **common)
           for v in variants for p in requested]
    devices = sorted({c.device for c in ort}, key=["cuda", "cpu"].index)
    modes = ["eager"] + (["compile"] if bench.torch_compile else [])
    baselines = [torch_candidate(model, m, d, **common) for d in devices for m in modes]
    rows = measure(ort + baselines, bench.batch_sizes, warmup=bench.warmup, iterations=bench.iterations,
                   rounds=bench.rounds, threads=bench.threads)
    if not bench.torch_compile:
        rows += [{"runtime": "torch", "mode": "compile", "device": d, "batch_size": b, "providers": [f"torch-{d}"],
                  "error": "skipped: benchmark.torch_compile is false"} for d in devices for b in bench.batch_sizes]
    sweep = concurrency_sweep(ort, bench.concurrency, batch_size=bench.concurrency_batch,
                              iterations=bench.iterations, rounds=bench.rounds)
    return ort, rows, sweep


def _result(bench: BenchmarkConfig, variants: list[Variant], ort: list, rows: list[dict], sweep: list[dict],
            requested: list[str]) -> dict:
    """What bench.json holds."""
    ort_rows = [r for r in rows if r["runtime"] == "onnxruntime"]
    torch_rows = [r for r in rows if r["runtime"] == "torch"]
    fallbacks = [c.resolved for c in ort if c.resolved and c.resolved.fallback]
    return {"onnx": str(variants[0].path), "variants": {v.name: str(v.path) for v in variants},
            "rows": compare(ort_rows, torch_rows), "onnxruntime": ort_rows, "torch": torch_rows, "concurrency": sweep,
            "providers": list(dict.fromkeys(p for c in ort for p in c.providers)), "requested_providers": requested,
            "fallback": [{"requested": r.requested, "ran": r.runs, "reason": r.reason, "notice": r.notice()}
                         for r in fallbacks],
            "notices": fallback_notices(fallbacks), "environment": environment(bench.threads),
            "config": dataclasses.asdict(bench)}


def _log_metrics(tracker: Tracker, comparison: list[dict]) -> None:
    for r in comparison:
        suffix = f"{r['variant']}_{r['ort_providers'][0].removesuffix('ExecutionProvider')}_b{r['batch_size']}"
        tracker.log_metrics({f"ort_images_per_s_{suffix}": r["ort_images_per_s"],
                             f"torch_images_per_s_{suffix}": r["torch_images_per_s"],
                             f"ort_p50_ms_{suffix}": r["ort_p50_ms"], f"speedup_{suffix}": r["speedup"]})


def bench_table(result: dict) -> str:
    """The printed table: bold fallback notices first (they change what every number means)."""
    lines = list(result.get("notices") or [])
    lines.append(format_table(result["rows"]))
    if result.get("concurrency"):
        lines += ["", "serving (threads sharing one session):",
                  format_table([{k: r[k] for k in ("variant", "providers", "threads", "batch_size", "images_per_s",
                                                   "latency_ms_p50", "latency_ms_p99", "scaling_per_thread")}
                                for r in result["concurrency"]])]
    errors = {(r["mode"], r["device"], r["error"]) for r in result.get("torch", []) if "error" in r}
    lines += [f"torch {mode} ({device}): {e}" for mode, device, e in sorted(errors)]
    return "\n".join(lines)


def _register(tracker: Tracker, onnx_path: Path, meta: dict, result: dict, name: str, in_ch: int, hw) -> dict | None:
    """Log and register the primary variant with the figures a reviewer of the version needs as tags."""
    figures = _parity_and_accuracy(onnx_path, meta)
    first = next((r for r in result["onnxruntime"] if "error" not in r), None)
    tags = {"parity_max_abs_diff": figures["parity_max_abs_diff"],
            "parity_top1_agreement": figures["parity_top1_agreement"],
            "accuracy": figures["accuracy"], "accuracy_source": figures["accuracy_source"],
            "benchmark_p50_ms": first["latency_ms_p50"] if first else None,
            "benchmark_p50_batch_size": first["batch_size"] if first else None,
            "providers": ",".join(result["providers"]),
            "fallback": " | ".join(result["notices"]) or "none"}
    package = onnxruntime_package()
    tags.update({"onnxruntime": f"{package['package']}=={package['version']}",
                 "cuda_major": package["cuda_major"], "cudnn_major": package["cudnn_major"]})
    # The providers this model was measured on, GPU first; CPU always last so a CPU host can serve it.
    serve_providers = [p for p in result["providers"] if p in GPU_PROVIDERS] + ["CPUExecutionProvider"]
    example = bench_input(1, in_ch, hw).numpy()
    registered = register_onnx_model(
        tracker, onnx_path, name=name, input_example=example, num_classes=meta["num_classes"],
        metadata=_serving_metadata(figures["info"], meta), pip_requirements=model_requirements(package),
        providers=serve_providers, tags={k: v for k, v in tags.items() if v is not None})
    if registered:
        print(f"[benchmark] registered {registered['model_uri']} ({onnx_path.name})")
    return registered
