"""The benchmark's picture: latency and throughput against batch size, and the serving sweep.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global backend
switch), so it works on a headless node and inside a process that uses matplotlib otherwise.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from pipeline.atomic import write_bytes


def _label(row: dict) -> str:
    if row["runtime"] == "onnxruntime":
        provider = row["providers"][0].removesuffix("ExecutionProvider")
        return f"ORT {row.get('variant')} ({provider})"
    return f"torch {row.get('mode')} ({row.get('device')})"


def plot_benchmark(rows: Sequence[dict], concurrency: Sequence[dict], path: str | Path,
                   notices: Sequence[str] = (), title: str = "") -> Path:
    """Write a PNG: p50 (with p90..p99 band) and images/s per batch size for every candidate, and
    images/s per thread count for the serving sweep; fallback notices go under the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            series.setdefault(_label(r), []).append(r)
    panels = 3 if concurrency else 2
    fig = Figure(figsize=(5.2 * panels, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    lat_ax, thr_ax = axes[0], axes[1]
    for i, (label, points) in enumerate(sorted(series.items())):
        points = sorted(points, key=lambda r: r["batch_size"])
        b = [p["batch_size"] for p in points]
        color = f"C{i % 10}"
        style = "-" if label.startswith("ORT") else "--"
        lat_ax.plot(b, [p["latency_ms_p50"] for p in points], style, marker="o", color=color, label=label)
        lat_ax.fill_between(b, [p["latency_ms_p90"] for p in points], [p["latency_ms_p99"] for p in points],
                            color=color, alpha=0.15, linewidth=0)
        thr_ax.plot(b, [p["images_per_s"] for p in points], style, marker="o", color=color, label=label)
    for ax, ylabel, what in ((lat_ax, "latency per batch, ms (p50; band p90-p99)", "Latency"),
                             (thr_ax, "images / s (best round)", "Throughput")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(what)
        ax.grid(True, which="both", alpha=0.3)
        batches = sorted({r["batch_size"] for r in rows})
        ax.set_xticks(batches, [str(x) for x in batches])
    thr_ax.legend(fontsize=8, loc="best")
    if concurrency:
        ax = axes[2]
        by: dict[str, list[dict]] = {}
        for r in concurrency:
            provider = r["providers"][0].removesuffix("ExecutionProvider")
            by.setdefault(f"ORT {r['variant']} ({provider})", []).append(r)
        for i, (label, points) in enumerate(sorted(by.items())):
            points = sorted(points, key=lambda r: r["threads"])
            ax.plot([p["threads"] for p in points], [p["images_per_s"] for p in points], "-", marker="s",
                    color=f"C{i % 10}", label=label)
        threads = sorted({r["threads"] for r in concurrency})
        ax.set_xticks(threads, [str(t) for t in threads])
        ax.set_xlabel(f"threads sharing one session (batch {concurrency[0]['batch_size']})")
        ax.set_ylabel("images / s (best round)")
        ax.set_title("Serving: concurrency")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    heading = title or "vitpipe benchmark"
    if notices:
        heading += "\n" + "\n".join(n.strip("*") for n in notices)
    fig.suptitle(heading, fontsize=11, color="firebrick" if notices else "black",
                 fontweight="bold" if notices else "normal")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes(path, buf.getvalue())
