"""`prepare`: an image source -> train/val WebDataset shards + manifest.json, locally or on S3.

The previous dataset stays usable until the new one is complete. Locally, the new ``shards/``
folder is built under a temporary name beside the old one (`pipeline.atomic.atomic_dir`), the old
manifest is removed only once every new shard is written and the new manifest checked, the folders
are swapped, and the new manifest is written last: at no moment does a manifest describe shards it
did not list. A failed or interrupted run (a full disk included) leaves the previous manifest and
shards as they were. On S3 the old manifest is deleted first (objects cannot be swapped), the
shards uploaded, the manifest last.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from pipeline.atomic import atomic_dir, remove_leftovers
from pipeline.config import DataConfig
from pipeline.data.errors import DataError, write_error
from pipeline.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, check_schema, manifest_text, write_manifest
from pipeline.data.shards import EncodeOptions, SplitShards, write_dataset_shards
from pipeline.data.sources import Source, load_source, split_train_val
from pipeline.data.storage import OutputTarget

SHARDS_FOLDER = "shards"


def _created() -> str:
    """UTC time of writing; SOURCE_DATE_EPOCH (the reproducible-builds variable) pins it."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return when.isoformat(timespec="seconds")


def _manifest_info(cfg: DataConfig, source: Source, written: dict[str, SplitShards]) -> dict:
    geometry = set().union(*(w.geometry for w in written.values()))  # of the stored (resized) images
    sizes = {(h, w) for h, w, _ in geometry}
    splits = {name: {"samples": written[name].samples,
                     "shards": [{**r, "name": f"{SHARDS_FOLDER}/{r['name']}"} for r in written[name].records]}
              for name in ("train", "val")}
    return {
        "format": MANIFEST_FORMAT,
        "source": cfg.source,
        "class_names": source.class_names,
        "num_classes": len(source.class_names),
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "channels": 1 if all(c == 1 for _, _, c in geometry) else 3,
        "image_format": cfg.image_format,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "shard_max_samples": cfg.shard_max_samples,
        "shard_max_bytes": cfg.shard_max_bytes,
        "resize_shorter_side": cfg.resize_shorter_side,
        "splits": splits,
        "max_corrupt_fraction": cfg.max_corrupt_fraction,
        "skipped": [s.to_dict(name) for name in ("train", "val") for s in written[name].skipped],
        "created": _created(),
    }


def prepare_dataset(cfg: DataConfig, out_dir: str | Path) -> Path | str:
    """Load `cfg`'s source, split it, write train/val shards in parallel, then the manifest.

    `out_dir` is a local folder or ``s3://bucket/prefix``; returns the manifest's path (local) or
    URL (S3). The same source and options give byte-identical shards and manifest (up to
    `created`) for any `cfg.workers`. A write that fails (a full disk) is a DataError naming the
    file; the previous dataset is kept.
    """
    target = OutputTarget.parse(out_dir)
    source = load_source(cfg, lazy=True)
    if not source.samples:
        raise DataError(f"data.source {cfg.source}: the dataset is empty (after limit={cfg.limit})")
    train, val = split_train_val(source.samples, cfg.val_fraction, cfg.seed)
    splits = {"train": train, "val": val}
    options = dict(max_samples=cfg.shard_max_samples, max_bytes=cfg.shard_max_bytes,
                   options=EncodeOptions(cfg.image_format, cfg.resize_shorter_side), workers=cfg.workers,
                   max_corrupt_fraction=cfg.max_corrupt_fraction)
    if target.is_s3:
        # drop the old manifest first: while shards are rewritten nothing may look complete
        target.delete(MANIFEST_NAME)
        written = write_dataset_shards(splits, target.child(SHARDS_FOLDER), **options)
        info = _manifest_info(cfg, source, written)
        check_schema(info, target.location(MANIFEST_NAME))
        target.put_bytes(manifest_text(info).encode(), MANIFEST_NAME)  # last
        return target.location(MANIFEST_NAME)
    final = Path(target.local)
    final.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)  # temporaries of a killed run (the stage lock keeps one writer at a time)
    try:
        with atomic_dir(final / SHARDS_FOLDER) as staging:
            written = write_dataset_shards(splits, OutputTarget.parse(staging), **options)
            info = _manifest_info(cfg, source, written)
            check_schema(info, final / MANIFEST_NAME)  # before anything of the old dataset goes
            (final / MANIFEST_NAME).unlink(missing_ok=True)  # then the folders are swapped
        return write_manifest(final, info)
    except OSError as e:  # the swap or the manifest: shards' own write errors name their file
        raise write_error(e, e.filename or final / MANIFEST_NAME) from None
