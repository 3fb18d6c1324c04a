"""Stage 1, prepare: images -> WebDataset tar shards + manifest.json.

Reads: an image source (data.source: mnist5k | digits | folder with data.root).
Writes: <out>/shards/{train,val}-NNNNNN.tar and <out>/manifest.json (written last).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.manifest import load_manifest
from pipeline.data.manifest import prepare_dataset
from pipeline.track import NullTracker, Tracker
from stages import record


def run(data: DataConfig, out_dir: str | Path, tracker: Tracker | None = None, force: bool = False) -> dict:
    """Shard the source; skipped when the same source and options were already prepared here."""
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    cfg = dataclasses.asdict(data)
    if data.source == "folder" and data.root:
        cfg["root"] = str(Path(data.root).resolve())
    fp = record.fingerprint("prepare", cfg, [])
    if not force and (done := record.completed(out_dir, fp)):
        print(f"[prepare] up to date: {done['manifest']}")
        return done
    record.begin(out_dir, fp)
    tracker.log_params({"data": cfg})
    manifest_path = prepare_dataset(data, out_dir)
    m = load_manifest(manifest_path)
    result = {
        "manifest": str(manifest_path),
        "train_samples": m.num_samples("train"),
        "val_samples": m.num_samples("val"),
        "train_shards": len(m.shard_paths("train")),
        "val_shards": len(m.shard_paths("val")),
        "num_classes": len(m.class_names),
        "image_size": m.image_size,
    }
    tracker.log_metrics({k: v for k, v in result.items() if isinstance(v, int)})
    tracker.log_artifact(manifest_path)
    record.finish(out_dir, "prepare", fp, [manifest_path], result)
    print(f"[prepare] {result['train_samples']} train / {result['val_samples']} val images in "
          f"{result['train_shards'] + result['val_shards']} shards -> {manifest_path}")
    return result
