"""Latency/throughput of an ONNX model under onnxruntime, with PyTorch eager fp32 as the baseline.

To keep the two comparable: both see the same seeded random-normal input per batch size, made
before timing starts; warmup runs are untimed; each timed run is one `time.perf_counter` interval
around one forward (synchronized on CUDA for PyTorch; onnxruntime's `run` returns host arrays, so
it is synchronous already). `environment()` records what the numbers were measured with.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.export.onnx_export import INPUT_NAME, OUTPUT_NAME, _device, _eval_mode, _hw, ort_session

INPUT_SEED = 0


def bench_input(batch_size: int, in_channels: int, image_size: int | Sequence[int], seed: int = INPUT_SEED) -> torch.Tensor:
    """The benchmark input for one batch size: seeded standard normal (B, C, H, W), fp32, on CPU."""
    h, w = _hw(image_size)
    g = torch.Generator().manual_seed(seed + batch_size)
    return torch.randn(batch_size, in_channels, h, w, generator=g, dtype=torch.float32)


def _check_counts(batch_sizes: Sequence[int], warmup: int, iterations: int) -> None:
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes: need positive sizes, got {list(batch_sizes)}")
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")


def _time_runs(fn: Callable[[], Any], warmup: int, iterations: int) -> np.ndarray:
    """Milliseconds of `iterations` calls of `fn`, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = np.empty(iterations, dtype=np.float64)
    for i in range(iterations):
        t0 = time.perf_counter()
        fn()
        times[i] = (time.perf_counter() - t0) * 1e3
    return times


def _row(runtime: str, batch_size: int, times_ms: np.ndarray, providers: list[str], warmup: int) -> dict:
    p50, p90, p99 = np.percentile(times_ms, [50, 90, 99])
    mean = float(times_ms.mean())
    return {
        "runtime": runtime,
        "batch_size": int(batch_size),
        "latency_ms_p50": float(p50),
        "latency_ms_p90": float(p90),
        "latency_ms_p99": float(p99),
        "latency_ms_mean": mean,
        "images_per_s": batch_size * 1000.0 / mean,
        "iterations": int(len(times_ms)),
        "warmup": int(warmup),
        "providers": list(providers),
    }


def benchmark_onnx(
    onnx_path: str | os.PathLike,
    batch_sizes: Sequence[int],
    *,
    image_size: int | Sequence[int],
    in_channels: int,
    warmup: int,
    iterations: int,
    providers: Sequence[str] | None = None,
    threads: int = 0,
) -> list[dict]:
    """One row per batch size: latency percentiles, throughput, and the providers that really ran."""
    _check_counts(batch_sizes, warmup, iterations)
    session, used = ort_session(Path(onnx_path), providers=providers, threads=threads)
    rows = []
    for b in batch_sizes:
        feed = {INPUT_NAME: bench_input(b, in_channels, image_size).numpy()}
        times = _time_runs(lambda: session.run([OUTPUT_NAME], feed), warmup, iterations)
        rows.append(_row("onnxruntime", b, times, used, warmup))
    return rows


def benchmark_torch(
    model: nn.Module,
    batch_sizes: Sequence[int],
    *,
    image_size: int | Sequence[int],
    in_channels: int,
    warmup: int,
    iterations: int,
    threads: int = 0,
) -> list[dict]:
    """The same rows for PyTorch eager fp32 under inference_mode, on the model's device."""
    _check_counts(batch_sizes, warmup, iterations)
    device = _device(model)
    cuda = device.type == "cuda"
    label = f"torch-{device.type}"
    previous_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    rows = []
    try:
        with _eval_mode(model), torch.inference_mode():
            for b in batch_sizes:
                x = bench_input(b, in_channels, image_size).to(device)

                def forward() -> None:
                    model(x)
                    if cuda:  # kernels are async: time until they are done, as ort.run does
                        torch.cuda.synchronize(device)

                times = _time_runs(forward, warmup, iterations)
                rows.append(_row("torch", b, times, [label], warmup))
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def compare(ort_rows: list[dict], torch_rows: list[dict]) -> list[dict]:
    """Per batch size present in both: throughput and p50 of each, and speedup = ort images/s / torch images/s."""
    by_batch = {r["batch_size"]: r for r in torch_rows}
    out = []
    for o in ort_rows:
        t = by_batch.get(o["batch_size"])
        if t is None:
            continue
        out.append(
            {
                "batch_size": o["batch_size"],
                "ort_p50_ms": o["latency_ms_p50"],
                "torch_p50_ms": t["latency_ms_p50"],
                "ort_images_per_s": o["images_per_s"],
                "torch_images_per_s": t["images_per_s"],
                "speedup": o["images_per_s"] / t["images_per_s"],
                "ort_providers": o["providers"],
            }
        )
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def format_table(rows: list[dict]) -> str:
    """A plain-text table (columns in first-seen key order); numbers right-aligned, text left-aligned."""
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]

    def line(values: list[str]) -> str:
        parts = [v.rjust(wd) if num else v.ljust(wd) for v, wd, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    header = line(columns)
    rule = "  ".join("-" * wd for wd in widths)
    return "\n".join([header, rule, *(line(row) for row in cells)])


def environment(threads: int = 0) -> dict:
    """What the benchmark numbers depend on: library versions, CPU count, thread settings, devices."""
    import onnx
    import onnxruntime as ort

    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cpus = os.cpu_count()
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        # Other work on the machine skews latencies (OpenMP barriers stall on a busy core): keep it on record.
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "threads_setting": int(threads),
        "torch_num_threads": int(threads) if threads > 0 else torch.get_num_threads(),
        "ort_intra_op_threads": int(threads) if threads > 0 else "default",
        "ort_available_providers": list(ort.get_available_providers()),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["torch_cuda"] = torch.version.cuda
    return env
