"""Evaluation batches: every sample of a split once, and every rank runs the same number of forwards.

Nothing distributed is imported here; callers pass `rank` and `world_size` as plain ints. Samples
are dealt round-robin to ranks and the last batches padded (ZeRO-3 needs every rank in each
forward); training streams live in `stream.py`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image

from pipeline.data.errors import DataError
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.shard_format import ImageRefused, decode_image, read_shard
from pipeline.data.storage import open_url
from pipeline.data.transforms import make_transform



def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")


# --------------------------------------------------------------------------- evaluation


def iter_split(manifest: Manifest | str | Path, split: str) -> Iterator[tuple[str, Image.Image, int]]:
    """(key, PIL image in its stored mode, label) for every sample of `split`, in manifest order.

    Shards are read beside the manifest, a local folder or a URL (s3://, http(s)://); each is
    checked against the manifest (size and sha256 before its first sample, count at its end).
    """
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    for location, record in zip(manifest.shard_locations(split), manifest.shards(split)):
        for sample in read_shard(open_url(location), record, record["name"], manifest.num_classes):
            try:
                image = decode_image(sample.image)
            except ImageRefused as e:  # evaluation skips nothing: every val image counts
                raise DataError(f"{sample.shard}: sample {sample.key!r} .{sample.image_suffix} {e.reason}") from None
            yield sample.key, image, sample.label


def eval_batches(
    manifest: Manifest | str | Path,
    split: str,
    *,
    image_size: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    rank: int,
    world_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, mask) batches of sample i % world_size == rank; every rank yields the same count.

    Batches always hold `batch_size` rows; padding rows are zeros with mask False, so every rank
    runs ceil(ceil(N / world_size) / batch_size) forwards (ZeRO-3 needs all ranks in each one).
    """
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    _check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    total = manifest.num_samples(split)
    num_batches = math.ceil(math.ceil(total / world_size) / batch_size)
    transform = make_transform(image_size, in_channels, mean, std)
    mine = (
        (transform(image), label)
        for i, (_, image, label) in enumerate(iter_split(manifest, split))
        if i % world_size == rank
    )
    shape = (batch_size, in_channels, image_size, image_size)
    for _ in range(num_batches):
        chunk = list(itertools.islice(mine, batch_size))
        images = torch.zeros(shape, dtype=torch.float32)
        labels = torch.zeros(batch_size, dtype=torch.int64)
        mask = torch.zeros(batch_size, dtype=torch.bool)
        for row, (image, label) in enumerate(chunk):
            images[row], labels[row], mask[row] = image, label, True
        yield images, labels, mask
    leftover = next(mine, None)  # also runs the shard count checks at the end of the stream
    if leftover is not None:
        raise DataError(f"{manifest.path}: split {split!r} holds more samples than the manifest's {total}")
