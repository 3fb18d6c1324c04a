"""The stages' pictures, for people who would rather look than read: training curves, the
held-out confusion matrix, the export variants' accuracy. Each is a PNG written atomically beside
the stage's JSON and logged to the stage's MLflow run.

Drawn as `export/benchmark_plot.py` draws: matplotlib's object API on an Agg canvas (no pyplot,
no display, no global backend switch), so it works on a headless rank.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.atomic import write_bytes

# Class names are written in the cells' axes up to this many classes; above it, only indices.
_NAMED_CLASSES = 30


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes(path, buf.getvalue())


def read_history(path: str | Path) -> list[dict]:
    """The records of a `metrics.jsonl` (one JSON object a line, each with its `step`); [] if absent."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(history: Sequence[Mapping], key: str) -> tuple[list, list]:
    points = sorted((r["step"], r[key]) for r in history if r.get(key) is not None)
    return [s for s, _ in points], [v for _, v in points]


def plot_training(history: Sequence[Mapping], path: str | Path, title: str) -> Path:
    """Loss, learning rate, throughput per logged step and val accuracy per evaluation, one panel each."""
    fig = _figure(14, 3.6)
    axes = fig.subplots(1, 4)
    panels = [("loss", "train loss (window mean)", "Loss"), ("lr", "learning rate (head)", "Learning rate"),
              ("images_per_s", "images / s (all ranks)", "Throughput")]
    for ax, (key, ylabel, name) in zip(axes, panels):
        steps, values = _series(history, key)
        ax.plot(steps, values, "-", marker="." if len(steps) < 50 else None, color="C0")
        ax.set_title(name)
        ax.set_ylabel(ylabel)
    ax = axes[3]
    for key, label, color in (("val_accuracy", "model", "C1"), ("val_accuracy_ema", "EMA", "C2")):
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, "-", marker="o", color=color, label=label)
    ax.set_ylim(0, 1)
    ax.set_title("Val accuracy per evaluation")
    ax.set_ylabel("top-1 on the held-out split")
    if ax.get_lines():
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_confusion(counts: Sequence[Sequence[int]], class_names: Sequence[str] | None, path: str | Path,
                   title: str) -> Path:
    """The confusion matrix (rows: true class, columns: predicted), each cell's count written in it
    when the classes are few, coloured by the share of its row (so a rare class reads as well)."""
    import numpy as np

    m = np.asarray(counts, dtype=np.int64)
    n = m.shape[0]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.45 * n, 16)
    fig = _figure(size + 1.2, size)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class's images", shrink=0.8)
    if n <= _NAMED_CLASSES:
        names = list(class_names) if class_names and len(class_names) == n else [str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(m.sum())
    ax.set_title(f"{title}\n{total} held-out images, top-1 {np.trace(m) / max(total, 1):.4f}", fontsize=10)
    return _save(fig, path)


def plot_variant_accuracy(variants: Mapping[str, Mapping], path: str | Path, title: str) -> Path:
    """Held-out top-1 of each exported variant beside PyTorch's fp32, with its drop in points."""
    fig = _figure(max(5, 1.3 * len(variants) + 2), 4)
    ax = fig.subplots()
    names = list(variants)
    top1 = [variants[v]["accuracy"]["top1"] for v in names]
    reference = next(iter(variants.values()))["accuracy"]["torch_fp32_top1"]
    bars = ax.bar(names, top1, color=[f"C{i % 10}" for i in range(len(names))])
    ax.axhline(reference, color="black", linestyle="--", linewidth=1, label=f"PyTorch fp32 {reference:.4f}")
    for bar, v in zip(bars, names):
        drop = variants[v]["accuracy"]["drop_points"]
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{bar.get_height():.4f}\n({0.0 - drop:+.2f} pt)",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("held-out top-1")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)
