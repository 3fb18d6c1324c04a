"""The image transform, and evaluation batches: every rank runs exactly the same number of forwards.

Nothing distributed is imported here; callers pass `rank` and `world_size` as plain ints.
Evaluation deals samples round-robin to ranks and pads; training streams live in `stream.py`.
"""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.data.manifest import IMAGE_SUFFIXES, DataError, Manifest, load_manifest
from pipeline.data.stream import read_shard



# --------------------------------------------------------------------------- transform


def _per_channel(values: Sequence[float], in_channels: int, name: str) -> torch.Tensor:
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * in_channels
    elif in_channels == 1 and len(set(values)) == 1:
        values = values[:1]  # an RGB-style [m, m, m] default is fine for a grayscale model
    elif len(values) != in_channels:
        raise ValueError(f"{name}: need 1 or {in_channels} value(s) for {in_channels}-channel images, got {values}")
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


class ImageTransform:
    """PIL image -> normalized float32 tensor (C, H, W); a class so loader workers can pickle it."""

    def __init__(self, image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float]):
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels: must be 1 or 3, got {in_channels}")
        if image_size < 1:
            raise ValueError(f"image_size: must be >= 1, got {image_size}")
        self.image_size = image_size
        self.mode = "L" if in_channels == 1 else "RGB"
        self.mean = _per_channel(mean, in_channels, "mean")
        self.std = _per_channel(std, in_channels, "std")
        if (self.std <= 0).any():
            raise ValueError(f"std: every value must be > 0, got {list(std)}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of `pixels`."""
        return (self.image_size, self.image_size, 1 if self.mode == "L" else 3)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """uint8 (H, W, C), converted to L/RGB and resized, not yet normalized.

        Channels last, as PIL holds them: turning them to (C, H, W) here would make every copy into a
        batch a strided one (52 us vs 4 us per 224 px image); `normalize` moves them where the batch
        lands.
        """
        if image.mode != self.mode:
            image = image.convert(self.mode)
        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(image)  # (H, W) or (H, W, C) uint8
        return pixels[:, :, None] if pixels.ndim == 2 else pixels

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., H, W, C) on any device -> float32 (..., C, H, W), scaled to [0, 1] and normalized."""
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        x = pixels.movedim(-1, -3).float() / 255.0
        return ((x - mean) / std).contiguous()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(torch.from_numpy(np.array(self.pixels(image))))  # a writable copy


def make_transform(image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    """The train/eval transform: convert to L/RGB, bicubic resize to image_size, scale to [0, 1], normalize."""
    return ImageTransform(image_size, in_channels, mean, std)


# --------------------------------------------------------------------------- pipeline stages


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")


# --------------------------------------------------------------------------- evaluation


def iter_split(manifest: Manifest | str | Path, split: str) -> Iterator[tuple[str, Image.Image, int]]:
    """(key, PIL image in its stored mode, label) for every sample of `split`, in manifest order.

    Shards are read beside the manifest, a local folder or a URL (s3://, http(s)://); each is
    checked against the manifest (size, sha256, count) as it streams past.
    """
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    for location, record in zip(manifest.shard_locations(split), manifest.shards(split)):
        for sample in read_shard(location, record, record["name"]):
            ext = next(e for e in IMAGE_SUFFIXES if e in sample)
            try:
                with io.BytesIO(sample[ext]) as f:
                    image = Image.open(f)
                    image.load()
            except Exception as e:
                raise DataError(f"{record['name']}: sample {sample['__key__']!r} cannot be decoded ({e})") from None
            yield sample["__key__"], image, int(sample["cls"].decode().strip())


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
