"""Stage 3, finetune: a weights pair at a higher resolution, resampled position embeddings, new head.

Reads: a model.safetensors/model.json pair (ours or imported), or a timm / Hugging Face / Google
.npz checkpoint, imported once into <out>/../imported/<format>-<hash>/ (outside the stage folder,
which a restart wipes), manifest.json (a local file or an
s3:// or http(s):// URL), the finetune config.
Writes: the same pair at the new resolution and classes under <out>, plus checkpoints/, result.json.
Also reports the pre-trained model's val accuracy at the new resolution before any fine-tuning.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import (FINETUNE_MODEL_FIELDS, ModelConfig, TrainConfig, finetune_model_config,
                             train_fingerprint_fields, validate_image_size)
from pipeline.data.manifest import load_manifest, manifest_location, verify_manifest
from pipeline.data.plan import check_train_plan
from pipeline.model.importers import resolve_init
from pipeline.model.weights import check_weights_pair
from pipeline.run_layout import weights_file as pair_weights_file, weights_meta_file
from pipeline.track import NullTracker, Tracker
from pipeline.train.job import TrainJob
from stages.training import run_training_stage
from stages import record
from stages.lineage import content_sha256, log_dataset_input


def run(train: TrainConfig, manifest: str | Path, init_from: str | Path, out_dir: str | Path,
        tracker: Tracker | None = None, force: bool = False, model: ModelConfig | None = None) -> dict:
    """Fine-tune the weights pair `init_from` at train.image_size; return the result with `weights`.

    `model` (the recipe's model.*) may set drop path, dropout and the resampling mode; any other
    field it sets must match the weights' architecture (config.finetune_model_config)."""
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    manifest = manifest_location(manifest)  # an absolute path, or the manifest's URL
    m = load_manifest(manifest)
    # Fail fast, before any process starts: a bad manifest, a file that is not a weights pair, a
    # checkpoint whose tensors do not fit its architecture, a resolution its patch size cannot take.
    verify_manifest(m, check_hashes=train.verify_shards == "full", train_base_url=train.shard_base_url)
    check_train_plan(m, train, keys="finetune.")  # shards enough for ranks x workers
    # Before fingerprinting: the stage's input is the imported pair, keyed by the source's hash.
    init_from = resolve_init(init_from, out_dir.parent / "imported")
    # Only the pair's metadata and tensor shapes: the ranks load and resample the weights, once.
    mcfg, stored = check_weights_pair(init_from)
    if model is not None:
        mcfg = finetune_model_config(mcfg, model, str(init_from))
    # The recipe's finetune.* was validated at load against the recipe's model.*; this is the one
    # check against the weights' own architecture (an imported checkpoint may have another patch).
    validate_image_size(train, mcfg, "finetune.")
    weights = Path(init_from)
    weights_file = pair_weights_file(weights) if weights.is_dir() else weights.with_suffix(".safetensors")
    source_image_size = [int(s) for s in stored["image_size"]]
    cfg = {"train": dataclasses.asdict(train)}
    model_settings = {k: getattr(mcfg, k) for k in FINETUNE_MODEL_FIELDS}
    fingerprinted = {"train": train_fingerprint_fields(train), "model": model_settings}
    inputs = [manifest, weights_file, weights_file.with_suffix(".json")]
    fp = record.fingerprint("finetune", fingerprinted, inputs)
    if not force and (done := record.completed(out_dir, fp)):
        print(f"[finetune] up to date: {done['weights']}")
        return done
    settings = record.settings(fingerprinted, inputs)
    # keeps checkpoints it can continue from, refuses other changes; --force retrains from scratch
    record.begin(out_dir, fp, resume=not force, stage_settings=settings, stage="finetune")
    record.mark_checkpoints(out_dir, fp, settings)
    init = str(weights_file.resolve())
    job = TrainJob(stage="finetune", model=mcfg, train=train,
                   manifest=manifest, out_dir=str(out_dir.resolve()), init_from=init,
                   extra_meta={"init_from": init, "init_image_size": source_image_size,
                               "pos_embed_init": train.pos_embed_init})
    params = {**cfg, "model": model_settings, "init_from": init, "init_image_size": source_image_size}
    dataset = log_dataset_input(tracker, manifest, "train")
    result = run_training_stage(job, train.ranks, tracker, params)
    tracker.log_lineage(inputs={"dataset": dataset, "weights": content_sha256(weights_file)},
                        outputs={"weights": content_sha256(pair_weights_file(out_dir))})
    result["init_image_size"] = source_image_size
    result["init_from"], result["pos_embed_init"] = init, train.pos_embed_init
    record.finish(out_dir, "finetune", fp, [pair_weights_file(out_dir), weights_meta_file(out_dir)], result)
    before = result.get("val_accuracy_before")
    before_s = f"{before:.4f}" if before is not None else "n/a (new head)"
    print(f"[finetune] val accuracy at {train.image_size}px: before fine-tuning {before_s}, "
          f"after {result['val_accuracy']:.4f} -> {result['weights']}")
    return result
