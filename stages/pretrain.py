"""Stage 2, pretrain: stream the train shards into a DeepSpeed ZeRO engine on N local ranks.

Reads: manifest.json (+ its shards; a local file or an s3:// or http(s):// URL), the model and
pretrain configs.
Writes: <out>/checkpoints/ (resumable DeepSpeed state), <out>/model.safetensors (consolidated fp32),
<out>/model.json (architecture, resolution, normalization, classes), result.json, train.log.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import ModelConfig, TrainConfig, train_fingerprint_fields
from pipeline.data.manifest import load_manifest, manifest_location, verify_manifest
from pipeline.run_layout import weights_file, weights_meta_file
from pipeline.track import NullTracker, Tracker
from pipeline.train.loop import TrainJob
from stages.training import run_training_stage
from stages import record
from stages.lineage import content_sha256, log_dataset_input


def build_job(model: ModelConfig, train: TrainConfig, manifest: str | Path, out_dir: str | Path) -> TrainJob:
    """The job every rank runs, the same whether launched here or submitted (stages/submit.py)."""
    manifest = manifest_location(manifest)  # an absolute path, or the manifest's URL
    return TrainJob(stage="pretrain", model=model, train=train,
                    manifest=manifest, out_dir=str(Path(out_dir).resolve()), extra_meta={"manifest": manifest})


def run(model: ModelConfig, train: TrainConfig, manifest: str | Path, out_dir: str | Path,
        tracker: Tracker | None = None, force: bool = False) -> dict:
    """Pre-train from scratch (or resume this folder's checkpoints); return the result with `weights`."""
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    manifest = manifest_location(manifest)
    # Fail fast, naming the file, before any process starts (for a URL manifest: a HEAD per shard).
    verify_manifest(load_manifest(manifest), check_hashes=train.verify_shards == "full",
                    train_base_url=train.shard_base_url)
    cfg = {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}
    fingerprinted = {**cfg, "train": train_fingerprint_fields(train)}
    fp = record.fingerprint("pretrain", fingerprinted, [manifest])
    if not force and (done := record.completed(out_dir, fp)):
        print(f"[pretrain] up to date: {done['weights']}")
        return done
    settings = record.settings(fingerprinted, [manifest])
    # keeps checkpoints it can continue from, refuses other changes; --force retrains from scratch
    record.begin(out_dir, fp, resume=not force, stage_settings=settings, stage="pretrain")
    record.mark_checkpoints(out_dir, fp, settings)
    dataset = log_dataset_input(tracker, manifest, "train")
    result = run_training_stage(build_job(model, train, manifest, out_dir), train.ranks, tracker, cfg)
    tracker.log_lineage(inputs={"dataset": dataset}, outputs={"weights": content_sha256(weights_file(out_dir))})
    record.finish(out_dir, "pretrain", fp, [weights_file(out_dir), weights_meta_file(out_dir)], result)
    print(f"[pretrain] val accuracy {result['val_accuracy']:.4f} at {train.image_size}px -> {result['weights']}")
    return result
