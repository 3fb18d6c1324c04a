"""Stage 2, pretrain: stream the train shards into a DeepSpeed ZeRO engine on N local ranks.

Reads: manifest.json (+ its shards; a local file or an s3:// or http(s):// URL), the model and
pretrain configs.
Writes: <out>/checkpoints/ (resumable DeepSpeed state), <out>/model.safetensors (consolidated fp32),
<out>/model.json (architecture, resolution, normalization, classes), result.json, train.log.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.atomic import write_json

from pipeline.config import ModelConfig, TrainConfig, train_fingerprint_fields
from pipeline.data.manifest import load_manifest, manifest_location, verify_manifest
from pipeline.data.plan import check_train_plan
from pipeline.run_layout import RESULT_FILE, SUBMITTED_FILE, weights_file, weights_meta_file
from pipeline.track import MLflowTracker, NullTracker, Tracker, continue_previous_run
from pipeline.train.job import TrainJob
from stages.training import resume_tracker, run_training_stage, tracked_run
from stages import record
from stages.lineage import content_sha256, log_dataset_input


def build_job(model: ModelConfig, train: TrainConfig, manifest: str | Path, out_dir: str | Path) -> TrainJob:
    """The job every rank runs, the same whether launched here or submitted (stages/submit.py)."""
    manifest = manifest_location(manifest)  # an absolute path, or the manifest's URL
    return TrainJob(stage="pretrain", model=model, train=train,
                    manifest=manifest, out_dir=str(Path(out_dir).resolve()), extra_meta={"manifest": manifest})


def _plan(model: ModelConfig, train: TrainConfig, manifest: str) -> tuple[dict, dict, str, dict]:
    """(params logged, fingerprinted config, fingerprint, flat settings) of a pre-training stage."""
    # Fail fast, naming the file, before any process starts (for a URL manifest: a HEAD per shard).
    m = load_manifest(manifest)
    verify_manifest(m, check_hashes=train.verify_shards == "full", train_base_url=train.shard_base_url)
    check_train_plan(m, train, keys="pretrain.")  # shards enough for ranks x workers
    cfg = {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}
    fingerprinted = {**cfg, "train": train_fingerprint_fields(train)}
    return cfg, fingerprinted, record.fingerprint("pretrain", fingerprinted, [manifest]), \
        record.settings(fingerprinted, [manifest])


def _finish(out_dir: Path, fp: str, result: dict, tracker: Tracker, dataset: str, image_size: int) -> dict:
    tracker.log_lineage(inputs={"dataset": dataset}, outputs={"weights": content_sha256(weights_file(out_dir))})
    record.finish(out_dir, "pretrain", fp, [weights_file(out_dir), weights_meta_file(out_dir)], result)
    print(f"[pretrain] val accuracy {result['val_accuracy']:.4f} at {image_size}px -> {result['weights']}")
    return result


def run(model: ModelConfig, train: TrainConfig, manifest: str | Path, out_dir: str | Path,
        tracker: Tracker | None = None, force: bool = False) -> dict:
    """Pre-train from scratch (or resume this folder's checkpoints); return the result with `weights`.

    A job `vitpipe submit` started for these same settings (`begin_submitted`) that has finished is
    taken as done, not trained again: its stage record is written and its MLflow run ended here."""
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    manifest = manifest_location(manifest)
    cfg, fingerprinted, fp, settings = _plan(model, train, manifest)
    if not force and (done := record.completed(out_dir, fp)):
        print(f"[pretrain] up to date: {done['weights']}")
        return done
    if not force and (done := _adopt_submitted(out_dir, fp, tracker, train.image_size)):
        return done
    # keeps checkpoints it can continue from, refuses other changes; --force retrains from scratch
    record.begin(out_dir, fp, resume=not force, stage_settings=settings, stage="pretrain")
    record.mark_checkpoints(out_dir, fp, settings)
    dataset = log_dataset_input(tracker, manifest, "train")
    result = run_training_stage(build_job(model, train, manifest, out_dir), train.ranks, tracker, cfg)
    return _finish(out_dir, fp, result, tracker, dataset, train.image_size)


def begin_submitted(model: ModelConfig, train: TrainConfig, manifest: str | Path, out_dir: str | Path,
                    tracker: Tracker, job: TrainJob) -> TrainJob:
    """The orchestrator's half of a submitted pre-training, before the scheduler starts the ranks:
    the same checks, checkpoint rules and MLflow run as a local `run`, and a `submitted.json`
    naming the fingerprint and the run, so that the next `run` of these settings takes the
    finished job as done (`_adopt_submitted`) or resumes its checkpoints. `job` is the rank-side
    job (paths as the ranks see them); it comes back with the MLflow run it logs to."""
    out_dir = Path(out_dir)
    manifest = manifest_location(manifest)
    cfg, _, fp, settings = _plan(model, train, manifest)
    record.begin(out_dir, fp, resume=True, stage_settings=settings, stage="pretrain")
    record.mark_checkpoints(out_dir, fp, settings)
    tracker, _ = resume_tracker(tracker, out_dir)  # a resubmission continues the checkpoint's run
    tracker.log_params(cfg)
    dataset = log_dataset_input(tracker, manifest, "train")
    if isinstance(tracker, MLflowTracker):
        job.tracking_uri, job.run_id = _absolute_sqlite(tracker.tracking_uri), tracker.run_id
    write_json(out_dir / SUBMITTED_FILE, {"fingerprint": fp, "mlflow_run_id": job.run_id,
                                          "tracking_uri": job.tracking_uri, "dataset": dataset})
    return job


def _absolute_sqlite(uri: str) -> str:
    """A relative ``sqlite:///mlflow.db`` made absolute: a scheduler starts the ranks in another
    folder, where the relative path would name another (empty) database."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _adopt_submitted(out_dir: Path, fp: str, tracker: Tracker, image_size: int) -> dict | None:
    """The result of a finished submitted job of fingerprint `fp` (recorded and its MLflow run
    ended FINISHED), or None: none was submitted, other settings, or it has not finished."""
    marker = out_dir / SUBMITTED_FILE
    if not marker.is_file():
        return None
    sub = json.loads(marker.read_text())
    result_path = out_dir / RESULT_FILE
    if sub.get("fingerprint") != fp or not (result_path.is_file() and weights_meta_file(out_dir).is_file()):
        return None
    result = {**json.loads(result_path.read_text()), "weights": str(weights_file(out_dir)), "submitted": True}
    run, owned = continue_previous_run(tracker, sub.get("mlflow_run_id"))
    with tracked_run(run, owned):
        run.log_artifact(weights_meta_file(out_dir))
        done = _finish(out_dir, fp, result, run, sub.get("dataset") or "", image_size)
    marker.unlink()
    print("[pretrain] the submitted job finished: recorded, not trained again")
    return done
