"""What each stage's MLflow run records about where its inputs came from.

Every run is tagged with the sha256 of the artifacts it consumed and produced (see
`Tracker.log_lineage`): prepare produces the dataset (its manifest), pretrain consumes it and
produces weights, finetune consumes dataset and weights, export consumes weights and produces the
ONNX model, benchmark consumes that. A registered model version's run leads back through these
tags to the dataset; training stages also record the dataset as an MLflow run input.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.data.manifest import file_sha256, load_manifest
from pipeline.data.storage import is_url, read_url
from pipeline.track import Tracker


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (or of a URL's), read in 1 MiB chunks: the digest lineage tags name."""
    if is_url(path):
        return hashlib.sha256(read_url(str(path), what="input")).hexdigest()
    return file_sha256(path)


def log_dataset_input(tracker: Tracker, manifest: str | Path, context: str) -> str:
    """Record the manifest as the run's dataset input (digest, source, split counts); its sha256."""
    m = load_manifest(manifest)
    digest = content_sha256(m.path)
    profile = {f"{split}_{what}": (sum(s["samples"] for s in shards) if what == "samples" else len(shards))
               for split, shards in m.splits.items() for what in ("samples", "shards")}
    profile["num_classes"] = m.num_classes
    tracker.log_dataset(m.source, digest, str(m.path), profile, context=context)
    return digest
