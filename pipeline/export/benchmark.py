"""Latency, throughput and memory of ONNX variants under onnxruntime, with PyTorch eager and
torch.compile measured in the same run on the same device.

What is timed ("candidates"): every ONNX variant on every execution provider asked for, and the
PyTorch model eager and compiled on each device those providers run on. All see the same seeded
random-normal input per batch size, made before timing starts.

Trustworthy on a shared, noisy machine:
- candidates are interleaved in `rounds` (every candidate once per round, the order rotated
  between rounds) so a burst of other load hits them alike; latency percentiles pool every timed
  run, while throughput (`images_per_s`) and every ratio use each candidate's best round;
- each timed run is one `time.perf_counter` interval around one forward that has finished: on
  CUDA, PyTorch is synchronized and onnxruntime's IO-binding run returns after its stream is done;
- the providers in a row are the ones the session really got (`session.get_providers()`), never
  the ones asked for; a requested provider that cannot run fails here (pipeline.export.providers)
  unless fallback is allowed, and then every row and the table say so.

On CUDA the onnxruntime sessions keep inputs and outputs on the device (OrtValue + IO binding),
capture a CUDA graph per batch size where onnxruntime allows (every node on the CUDA provider;
otherwise the row says why not), and TensorRT builds fp16 engines into an on-disk cache.

Peak memory per candidate and batch size: the resident-set growth of this process on CPU (Linux
`VmHWM`, reset through /proc/self/clear_refs before each measurement), the CUDA allocator's peak
for PyTorch, and the growth of used device memory for onnxruntime (its arena is invisible to
PyTorch). A serving sweep times N threads sharing one session (`concurrency`).
"""

from __future__ import annotations

import copy
import os
import platform
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.export.onnx_export import INPUT_NAME, OUTPUT_NAME, _eval_mode, _hw, model_device, ort_session
from pipeline.export.providers import (
    CPU, CUDA, GPU_PROVIDERS, TENSORRT, ResolvedProvider, check_session_providers, resolve_requested,
)
from pipeline.progress import Progress

INPUT_SEED = 0
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def bench_input(batch_size: int, in_channels: int, image_size: int | Sequence[int], seed: int = INPUT_SEED) -> torch.Tensor:
    """The benchmark input for one batch size: seeded standard normal (B, C, H, W), fp32, on CPU."""
    h, w = _hw(image_size)
    g = torch.Generator().manual_seed(seed + batch_size)
    return torch.randn(batch_size, in_channels, h, w, generator=g, dtype=torch.float32)


def _check_counts(batch_sizes: Sequence[int], warmup: int, iterations: int, rounds: int = 1) -> None:
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes: need positive sizes, got {list(batch_sizes)}")
    if iterations < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"need iterations >= 1, warmup >= 0 and rounds >= 1, got {iterations}, {warmup} and {rounds}")


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


# --------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_rss_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: the peak memory a block of work added, in MiB (`mib`), and how it was measured (`kind`)."""

    def __init__(self, device: str, runtime: str):
        self.device, self.runtime = device, runtime
        self.mib: float | None = None
        self.kind = {("cpu", "torch"): "rss_delta", ("cpu", "onnxruntime"): "rss_delta",
                     ("cuda", "torch"): "cuda_peak_allocated", ("cuda", "onnxruntime"): "cuda_used_delta"}[(device, runtime)]

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda" and not torch.cuda.is_available():  # onnxruntime-gpu beside a CPU torch
            self.kind = "unavailable (this torch has no CUDA to query device memory)"
            self.device = "none"
        elif self.device == "cuda":
            torch.cuda.synchronize()
            if self.runtime == "torch":
                self._base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                free, total = torch.cuda.mem_get_info()
                self._base = total - free
        else:
            self._ok = _reset_rss_peak()
            self._base = _proc_status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None or self.device == "none":
            return
        if self.device == "cuda":
            torch.cuda.synchronize()
            if self.runtime == "torch":
                peak = torch.cuda.max_memory_allocated()
            else:
                free, total = torch.cuda.mem_get_info()
                peak = total - free
            self.mib = max(0.0, (peak - self._base) / 2**20)
        else:
            hwm = _proc_status_kb("VmHWM")
            if self._ok and hwm is not None and self._base is not None:
                self.mib = max(0.0, (hwm - self._base) / 1024)


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One thing being timed: an ONNX variant on one provider, or the PyTorch model in one mode on one device."""

    runtime: str  # "onnxruntime" | "torch"
    name: str  # the variant's name, or the torch mode ("eager", "compile")
    device: str  # "cpu" | "cuda"
    providers: list[str]  # what really ran: the session's providers, or ["torch-<device>"]
    runner: Callable[[int], Callable[[], None]]  # batch size -> a no-argument forward, its input made already
    thread_runner: Callable[[int], Callable[[], None]] | None = None  # like runner, safe to call from a thread
    info: dict = field(default_factory=dict)  # extra row columns (requested provider, fallback, io_binding, ...)
    error: str | None = None  # set when it could not run at all (e.g. torch.compile without a compiler)
    resolved: ResolvedProvider | None = None  # onnxruntime: the provider requested, the one that ran, why


def _ort_input(session, batch: int, in_channels: int, image_size) -> np.ndarray:
    """The benchmark input in the dtype the session's input declares (an fp16 variant takes fp16)."""
    declared = session.get_inputs()[0].type
    dtype = _ORT_DTYPES.get(declared)
    if dtype is None:
        raise ValueError(f"input {INPUT_NAME!r} has type {declared}; the benchmark feeds float images")
    return bench_input(batch, in_channels, image_size).numpy().astype(dtype, copy=False)


def _host_runner(session, in_channels: int, image_size) -> Callable[[int], Callable[[], None]]:
    def make(batch: int) -> Callable[[], None]:
        feed = {INPUT_NAME: _ort_input(session, batch, in_channels, image_size)}
        return lambda: session.run([OUTPUT_NAME], feed)

    return make


def _device_runner(session, in_channels: int, image_size) -> Callable[[int], Callable[[], None]]:
    """Runs with inputs and outputs bound on the GPU: no host copy inside the timed interval."""
    import onnxruntime as ort

    out = session.get_outputs()[0]
    out_dtype = _ORT_DTYPES.get(out.type, np.float32)

    def make(batch: int) -> Callable[[], None]:
        x = ort.OrtValue.ortvalue_from_numpy(_ort_input(session, batch, in_channels, image_size), "cuda", 0)
        classes = out.shape[1] if isinstance(out.shape[1], int) else session.run([OUTPUT_NAME], {
            INPUT_NAME: _ort_input(session, 1, in_channels, image_size)})[0].shape[1]
        # A preallocated output keeps its address from run to run, which a CUDA graph replay needs.
        y = ort.OrtValue.ortvalue_from_shape_and_type([batch, classes], out_dtype, "cuda", 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, x)
        binding.bind_ortvalue_output(OUTPUT_NAME, y)
        # run_with_iobinding synchronizes the provider's stream before returning (onnxruntime's
        # default), so the timed interval ends when the GPU is done.
        return lambda: session.run_with_iobinding(binding)

    return make


def _provider_entries(provider: str, *, tensorrt_fp16: bool, trt_cache: Path | None,
                      in_channels: int, image_size, max_batch: int) -> list:
    """The provider list for one session: options where the provider takes them, the fallbacks onnxruntime
    needs behind it (TensorRT hands unsupported nodes to CUDA, CUDA hands shape ops to CPU)."""
    if provider == TENSORRT:
        h, w = _hw(image_size)
        shape = lambda b: f"{INPUT_NAME}:{b}x{in_channels}x{h}x{w}"  # noqa: E731
        opts = {"trt_fp16_enable": bool(tensorrt_fp16), "trt_engine_cache_enable": trt_cache is not None,
                "trt_timing_cache_enable": trt_cache is not None,
                # one optimization profile covering every batch size: no engine rebuild when the batch changes
                "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(max_batch),
                "trt_profile_max_shapes": shape(max_batch)}
        if trt_cache is not None:
            opts["trt_engine_cache_path"] = str(trt_cache)
            opts["trt_timing_cache_path"] = str(trt_cache)
        return [(TENSORRT, opts), CUDA, CPU]
    if provider == CUDA:
        return [CUDA, CPU]
    return [provider] if provider == CPU else [provider, CPU]


def onnx_candidate(
    variant: str,
    onnx_path: str | os.PathLike,
    provider: str,
    *,
    in_channels: int,
    image_size,
    batch_sizes: Sequence[int],
    threads: int = 0,
    allow_fallback: bool = False,
    io_binding: bool = True,
    cuda_graph: bool = True,
    tensorrt_fp16: bool = True,
    trt_cache: Path | None = None,
) -> Candidate:
    """The onnxruntime candidate for one variant on one requested provider (checked before and after
    the session is created; a ProviderError unless `allow_fallback`)."""
    resolved = resolve_requested(provider, allow_fallback)
    entries = _provider_entries(resolved.runs, tensorrt_fp16=tensorrt_fp16, trt_cache=trt_cache,
                                in_channels=in_channels, image_size=image_size, max_batch=max(batch_sizes))
    session, used = ort_session(Path(onnx_path), providers=entries, threads=threads)
    resolved = check_session_providers(resolved, used, allow_fallback, f"{onnx_path}")
    on_gpu = resolved.runs in GPU_PROVIDERS
    device_bound = on_gpu and io_binding
    plain = (_device_runner if device_bound else _host_runner)(session, in_channels, image_size)
    info = {"requested_provider": provider, "fallback": resolved.fallback,
            "fallback_reason": resolved.reason if resolved.fallback else None,
            "io_binding": device_bound, "cuda_graph": False}
    runner = plain
    if resolved.runs == CUDA and cuda_graph and io_binding:
        info["cuda_graph"] = True
        runner = _cuda_graph_runner(onnx_path, threads, in_channels, image_size, plain, info)
    return Candidate("onnxruntime", variant, "cuda" if on_gpu else "cpu", list(used), runner, plain, info,
                     resolved=resolved)


def _cuda_graph_runner(onnx_path, threads, in_channels, image_size, plain, info: dict):
    """One CUDA-graph session per batch size (a captured graph is fixed to its shapes and addresses);
    where onnxruntime refuses (a node off the CUDA provider), the plain IO-binding runner, with
    info["cuda_graph"] set False and the reason in info["cuda_graph_note"]."""
    def make(batch: int) -> Callable[[], None]:
        if not info["cuda_graph"]:
            return plain(batch)
        try:
            session, _ = ort_session(Path(onnx_path), providers=[(CUDA, {"enable_cuda_graph": "1"})], threads=threads)
            fn = _device_runner(session, in_channels, image_size)(batch)
            fn()  # the first run captures the graph: fail here, not inside the timed runs
            return fn  # the closure keeps its session alive
        except Exception as e:  # onnxruntime says why (e.g. nodes assigned to CPU)
            info["cuda_graph"] = False
            info["cuda_graph_note"] = f"CUDA graph not possible: {str(e).strip().splitlines()[0][:300]}"
            return plain(batch)

    return make


def torch_candidate(model: nn.Module, mode: str, device: str, *, in_channels: int, image_size) -> Candidate:
    """PyTorch fp32 under inference_mode on `device`, eager or torch.compile (inductor); a compile that
    cannot work here (no C++ compiler, an unsupported backend) gives a candidate with `error` set."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        # onnxruntime-gpu runs on the GPU, this torch cannot: say so rather than compare across devices
        return Candidate("torch", mode, "cuda", ["torch-cuda"], lambda b: (lambda: None), info={"mode": mode},
                         error=f"this torch build ({torch.__version__}) has no CUDA: no PyTorch baseline on the GPU")
    net = model if model_device(model) == dev else copy.deepcopy(model).to(dev)
    net.eval()
    forward_module = net
    error = None
    if mode == "compile":
        try:
            forward_module = torch.compile(net)
        except Exception as e:
            error = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    cuda = dev.type == "cuda"

    def make(batch: int) -> Callable[[], None]:
        x = bench_input(batch, in_channels, image_size).to(dev)

        def forward() -> None:
            with torch.inference_mode():
                forward_module(x)
            if cuda:  # kernels are async: time until they are done
                torch.cuda.synchronize(dev)

        return forward

    return Candidate("torch", mode, dev.type, [f"torch-{dev.type}"], make, info={"mode": mode}, error=error)


def _compile_first(cand: Candidate, batch_sizes: Sequence[int]) -> None:
    """Compile (once per batch size) before any timing; a failure marks the candidate, with the reason."""
    if cand.error or cand.info.get("mode") != "compile":
        return
    try:
        for b in batch_sizes:
            cand.runner(b)()
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        cand.error = f"torch.compile cannot run here: {type(e).__name__}: {first}"


# --------------------------------------------------------------------------- measuring


def _row(cand: Candidate, batch: int, rounds: list[np.ndarray], warmup: int, memory: PeakMemory | None) -> dict:
    pooled = np.concatenate(rounds)
    p50, p90, p99 = np.percentile(pooled, [50, 90, 99])
    best = min(rounds, key=lambda t: float(t.mean()))
    row = {
        "runtime": cand.runtime,
        "variant" if cand.runtime == "onnxruntime" else "mode": cand.name,
        "device": cand.device,
        "batch_size": int(batch),
        "latency_ms_p50": float(p50),
        "latency_ms_p90": float(p90),
        "latency_ms_p99": float(p99),
        "latency_ms_mean": float(pooled.mean()),
        "best_round_p50_ms": float(min(np.median(t) for t in rounds)),
        "images_per_s": batch * 1000.0 / float(best.mean()),  # the best round's throughput
        "iterations": int(len(rounds[0])),
        "rounds": len(rounds),
        "warmup": int(warmup),
        "providers": list(cand.providers),
        "peak_memory_mib": memory.mib if memory else None,
        "memory_kind": memory.kind if memory else None,
    }
    row.update({k: v for k, v in cand.info.items() if k != "mode"})
    return row


def measure(candidates: Sequence[Candidate], batch_sizes: Sequence[int], *, warmup: int, iterations: int,
            rounds: int = 1, threads: int = 0) -> list[dict]:
    """Time every candidate at every batch size in interleaved rounds; one row per (candidate, batch)."""
    _check_counts(batch_sizes, warmup, iterations, rounds)
    previous_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        for cand in candidates:
            _compile_first(cand, batch_sizes)
        live = [c for c in candidates if c.error is None]
        runners = {(id(c), b): c.runner(b) for c in live for b in batch_sizes}  # inputs made before timing
        times: dict[tuple[int, int], list[np.ndarray]] = {k: [] for k in runners}
        memory: dict[tuple[int, int], PeakMemory] = {}
        progress = Progress("[benchmark] timing", rounds * len(runners), "runs")  # shown between runs, never inside
        for r in range(rounds):
            order = live[r % len(live):] + live[: r % len(live)] if live else []
            for b in batch_sizes:
                for cand in order:
                    key = (id(cand), b)
                    with PeakMemory(cand.device, cand.runtime) as mem:
                        times[key].append(_time_runs(runners[key], warmup, iterations))
                    if key not in memory or (mem.mib or 0) > (memory[key].mib or 0):
                        memory[key] = mem
                    progress.update()
        progress.close()
    finally:
        torch.set_num_threads(previous_threads)
    rows = []
    for cand in candidates:
        for b in batch_sizes:
            if cand.error is not None:
                rows.append({"runtime": cand.runtime, "mode": cand.name, "device": cand.device, "batch_size": int(b),
                             "providers": list(cand.providers), "error": cand.error})
            else:
                rows.append(_row(cand, b, times[(id(cand), b)], warmup, memory[(id(cand), b)]))
    return rows


def concurrency_sweep(candidates: Sequence[Candidate], levels: Sequence[int], *, batch_size: int,
                      iterations: int, rounds: int = 1) -> list[dict]:
    """Serving: N threads sharing one onnxruntime session, each sending `iterations` batches of
    `batch_size` as fast as it can; per (candidate, N) the best round's throughput and the pooled
    per-request latency. onnxruntime releases the GIL inside run(), so the threads really overlap."""
    if not levels:
        return []
    if any(n < 1 for n in levels) or batch_size < 1 or iterations < 1:
        raise ValueError(f"concurrency: need thread counts >= 1 and batch_size, iterations >= 1; got "
                         f"{list(levels)}, {batch_size}, {iterations}")
    ort_cands = [c for c in candidates if c.runtime == "onnxruntime" and c.error is None and c.thread_runner]
    results: dict[tuple[int, int], dict] = {}
    for r in range(rounds):
        for cand in ort_cands:
            for n in levels:
                runners = [cand.thread_runner(batch_size) for _ in range(n)]  # one input/binding per thread
                for fn in runners:
                    fn()  # warm
                latencies = [np.empty(iterations) for _ in range(n)]
                start = threading.Barrier(n + 1)

                def work(i: int) -> None:
                    start.wait()
                    for k in range(iterations):
                        t0 = time.perf_counter()
                        runners[i]()
                        latencies[i][k] = (time.perf_counter() - t0) * 1e3

                workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
                for t in workers:
                    t.start()
                start.wait()
                t0 = time.perf_counter()
                for t in workers:
                    t.join()
                wall = time.perf_counter() - t0
                entry = results.setdefault((id(cand), n), {"cand": cand, "lat": [], "best": 0.0})
                entry["lat"].append(np.concatenate(latencies))
                entry["best"] = max(entry["best"], n * iterations * batch_size / wall)
    rows = []
    for cand in ort_cands:
        base = results[(id(cand), levels[0])]["best"] / levels[0] if levels else None
        for n in levels:
            e = results[(id(cand), n)]
            lat = np.concatenate(e["lat"])
            rows.append({"variant": cand.name, "providers": list(cand.providers), "device": cand.device,
                         "threads": int(n), "batch_size": int(batch_size), "images_per_s": e["best"],
                         "requests_per_s": e["best"] / batch_size,
                         "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
                         # images/s per thread relative to the first level's: 1.0 is perfect scaling
                         "scaling_per_thread": (e["best"] / n) / base if base else None})
    return rows


# --------------------------------------------------------------------------- one-candidate helpers


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
    rounds: int = 1,
    allow_fallback: bool = False,
) -> list[dict]:
    """One ONNX file on its first provider (default: what can run here): one row per batch size."""
    from pipeline.export.providers import default_providers

    provider = list(providers)[0] if providers else default_providers()[0]
    cand = onnx_candidate(Path(onnx_path).stem, onnx_path, provider, in_channels=in_channels, image_size=image_size,
                           batch_sizes=batch_sizes, threads=threads, allow_fallback=allow_fallback)
    return measure([cand], batch_sizes, warmup=warmup, iterations=iterations, rounds=rounds, threads=threads)


def benchmark_torch(
    model: nn.Module,
    batch_sizes: Sequence[int],
    *,
    image_size: int | Sequence[int],
    in_channels: int,
    warmup: int,
    iterations: int,
    threads: int = 0,
    mode: str = "eager",
    rounds: int = 1,
) -> list[dict]:
    """PyTorch fp32 (eager or compile) on the model's device: one row per batch size."""
    with _eval_mode(model):
        cand = torch_candidate(model, mode, model_device(model).type, in_channels=in_channels, image_size=image_size)
        return measure([cand], batch_sizes, warmup=warmup, iterations=iterations, rounds=rounds, threads=threads)


def compare(ort_rows: list[dict], torch_rows: list[dict]) -> list[dict]:
    """Per onnxruntime row: PyTorch eager on the same device and batch size beside it, and speedup =
    ORT images/s / eager images/s (each one's best round); vs torch.compile too where it ran."""
    by_key = {(t.get("mode", "eager"), t.get("device", "cpu"), t["batch_size"]): t
              for t in torch_rows if "error" not in t}
    out = []
    for o in ort_rows:
        if "error" in o:
            continue
        t = by_key.get(("eager", o.get("device", "cpu"), o["batch_size"]))
        if t is None:
            continue
        row = {
            "batch_size": o["batch_size"],
            "variant": o.get("variant"),
            "ort_p50_ms": o["latency_ms_p50"],
            "torch_p50_ms": t["latency_ms_p50"],
            "ort_images_per_s": o["images_per_s"],
            "torch_images_per_s": t["images_per_s"],
            "speedup": o["images_per_s"] / t["images_per_s"],
            "ort_providers": o["providers"],
        }
        c = by_key.get(("compile", o.get("device", "cpu"), o["batch_size"]))
        if c is not None:
            row["vs_compile"] = o["images_per_s"] / c["images_per_s"]
        if o.get("fallback"):
            row["fallback"] = f"{o.get('requested_provider')} requested"
        out.append(row)
    return out


# --------------------------------------------------------------------------- reporting


def fallback_notices(resolved: Sequence[ResolvedProvider]) -> list[str]:
    """One bold line per distinct fallback, for the table and bench.json."""
    seen: list[str] = []
    for r in resolved:
        if r.fallback and r.notice() not in seen:
            seen.append(r.notice())
    return seen


def environment(threads: int = 0) -> dict:
    """What the benchmark numbers depend on: library versions, CPU count, thread settings, devices."""
    import onnx
    import onnxruntime as ort

    from pipeline.export.providers import onnxruntime_package

    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cpus = os.cpu_count()
    pkg = onnxruntime_package()
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_package": pkg["package"],
        "onnxruntime_cuda_major": pkg["cuda_major"],
        "onnxruntime_cudnn_major": pkg["cudnn_major"],
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
