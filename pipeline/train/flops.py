"""Peak throughput of one rank's device, for model FLOP utilization (MFU)."""

from __future__ import annotations

import time

import torch


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                        seconds: float = 0.5, windows: int = 1) -> float:
    """Dense matmul TFLOP/s this process reaches now: the best of `windows` timed windows sharing
    `seconds` (run on every rank at once: the share it really gets). The one peak measurement:
    training's MFU (loop.py) and `vitpipe bench train` both use it."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm up kernels and caches
        a @ b
    sync()
    best = 0.0
    for _ in range(windows):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            a @ b
            n += 1
        sync()
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start) / 1e12)
    return best
