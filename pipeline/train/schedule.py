"""Learning-rate schedules as multipliers of the peak rate (for torch's LambdaLR)."""

from __future__ import annotations

import math


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant."""
    if warmup > 0 and step < warmup:
        # (step + 1) so the very first update already moves; reaches the peak at step warmup - 1.
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * decay
