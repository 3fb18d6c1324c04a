"""Stage 1, prepare: images -> WebDataset tar shards + manifest.json.

Reads: an image source (data.source: mnist5k | digits | folder with data.root | list with
data.list_file | synthetic).
Writes: <out>/shards/{train,val}-NNNNNN.tar and <out>/manifest.json (written last); <out> is
data.output when set (a folder or s3://bucket/prefix), else the stage's folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.manifest import MANIFEST_NAME
from pipeline.data.prepare import prepare_dataset
from pipeline.data.sources import source_identity
from pipeline.data.storage import OutputTarget
from pipeline.track import NullTracker, Tracker
from stages import record
from stages.lineage import content_sha256


def run(data: DataConfig, out_dir: str | Path, tracker: Tracker | None = None, force: bool = False) -> dict:
    """Shard the source; skipped when the same source and options were already prepared here."""
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    cfg = dataclasses.asdict(data)
    cfg.pop("workers")  # the output does not depend on it
    # The source is identified by its content, not where it lives: a changed folder or list reruns
    # prepare, a moved one (or an unchanged one) does not.
    cfg.pop("root")
    cfg.pop("list_file")
    fp = record.fingerprint("prepare", {**cfg, "source_identity": source_identity(data)}, [])
    if not force and (done := record.completed(out_dir, fp)):
        print(f"[prepare] up to date: {done['manifest']}")
        return done
    # the previous dataset stays until prepare_dataset swaps in a complete new one
    record.begin(out_dir, fp, keep=frozenset({MANIFEST_NAME, "shards"}))
    tracker.log_params({"data": dataclasses.asdict(data)})
    # data.output (a folder or s3://bucket/prefix) overrides --out for the dataset itself;
    # the stage's record stays in out_dir
    manifest_path = prepare_dataset(data, data.output or out_dir)
    if isinstance(manifest_path, Path):
        info = json.loads(manifest_path.read_text())
    else:  # on S3: keep a local copy for tracking (its shard names do not resolve locally)
        info = json.loads(OutputTarget.parse(data.output).get_bytes("manifest.json"))
    splits = info["splits"]
    result = {
        "manifest": str(manifest_path),
        "train_samples": splits["train"]["samples"],
        "val_samples": splits["val"]["samples"],
        "train_shards": len(splits["train"]["shards"]),
        "val_shards": len(splits["val"]["shards"]),
        "num_classes": len(info["class_names"]),
        "image_size": info["image_size"],
        "skipped": len(info.get("skipped", [])),
    }
    for s in info.get("skipped", []):  # every skipped file, in the log as in the manifest
        print(f"[prepare] skipped {s['path'] or s['key']} ({s['split']}): {s['reason']}")
    tracker.log_metrics({k: v for k, v in result.items() if isinstance(v, int)})
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(manifest_path, Path):
        tracker.log_artifact(manifest_path)
    tracker.log_lineage(outputs={"dataset": content_sha256(manifest_path)})
    record.finish(out_dir, "prepare", fp, [manifest_path] if isinstance(manifest_path, Path) else [], result)
    skipped = f", {result['skipped']} unreadable image(s) skipped (listed in the manifest)" if result["skipped"] else ""
    print(f"[prepare] {result['train_samples']} train / {result['val_samples']} val images in "
          f"{result['train_shards'] + result['val_shards']} shards{skipped} -> {manifest_path}")
    return result
