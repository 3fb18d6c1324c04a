"""Streaming shards into batches: infinite shuffled training batches and equal-length eval batches.

Nothing distributed is imported here; callers pass `rank` and `world_size` as plain ints.
Training streams shards split by rank and then by loader worker; evaluation deals samples
round-robin to ranks and pads, so every rank runs exactly the same number of forwards.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from pipeline.data.manifest import IMAGE_SUFFIXES, DataError, Manifest, load_manifest

_IMAGE_FIELDS = ";".join(IMAGE_SUFFIXES)  # to_tuple takes the first of "png;jpg" present


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

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != self.mode:
            image = image.convert(self.mode)
        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (C, H, W)
        return (x - self.mean) / self.std


def make_transform(image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    """The train/eval transform: convert to L/RGB, bicubic resize to image_size, scale to [0, 1], normalize."""
    return ImageTransform(image_size, in_channels, mean, std)


# --------------------------------------------------------------------------- pipeline stages


def _decode_image(key: str, data: bytes):
    """webdataset decoder handler: png/jpg -> PIL image in its stored mode (the transform converts)."""
    if key.rsplit(".", 1)[-1].lower() not in ("png", "jpg", "jpeg"):
        return None  # not ours: let the default handlers decode .cls to int
    with io.BytesIO(data) as stream:
        image = Image.open(stream)
        image.load()
    return image


def _raise_decoding_error(exn: Exception) -> bool:
    """webdataset exception handler: DecodingError carries the shard and key but no message."""
    url, key, field = getattr(exn, "url", None), getattr(exn, "key", None), getattr(exn, "k", None)
    cause = exn.__cause__ or exn
    raise DataError(f"{url}: sample {key!r} field {field!r} cannot be decoded ({cause})") from exn


class _ReadShards:
    """Stage: {"url"} items -> raw samples via wds.tarfile_to_samples, checked against the manifest.

    webdataset re-raises read errors by default, but a tar cut at a member boundary just ends
    early and a sample may lack a field; both would silently shrink an epoch. So each shard's
    size is checked before reading, its sample count after, and any error names the shard.
    """

    def __init__(self, expected: dict[str, dict]):
        self.expected = expected  # url -> shard record {name, samples, bytes, sha256}

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        state = {"url": None, "count": 0}

        def opened(items: Iterable[dict]) -> Iterator[dict]:
            for item in items:
                # webdataset reads one shard to its end before asking for the next url
                self._check_count(state["url"], state["count"])
                url = item["url"]
                size = Path(url).stat().st_size if Path(url).is_file() else None
                if size is None:
                    raise DataError(f"{url}: shard is missing")
                if size != self.expected[url]["bytes"]:
                    raise DataError(
                        f"{url}: shard is {size} bytes but the manifest records {self.expected[url]['bytes']} "
                        "(truncated or rewritten; re-run prepare)"
                    )
                state["url"], state["count"] = url, 0
                yield item

        try:
            for sample in wds.tarfile_to_samples()(opened(src)):
                if not any(f in sample for f in IMAGE_SUFFIXES) or "cls" not in sample:
                    fields = sorted(k for k in sample if not k.startswith("__"))
                    raise DataError(
                        f"{state['url']}: sample {sample['__key__']!r} lacks an image or .cls (has {fields})"
                    )
                state["count"] += 1
                yield sample
        except DataError:
            raise
        except Exception as exn:  # tarfile, gzip or I/O errors from inside webdataset
            message = exn.args[0] if exn.args else exn
            raise DataError(f"{state['url']}: cannot read shard ({type(exn).__name__}: {message})") from exn
        self._check_count(state["url"], state["count"])

    def _check_count(self, url: str | None, count: int) -> None:
        if url is not None and count != self.expected[url]["samples"]:
            raise DataError(f"{url}: read {count} samples but the manifest records {self.expected[url]['samples']}")


class _TrainShardSource:
    """First stage: for epoch 0, 1, ...: shuffle shards with Random(seed + epoch), keep this rank's and worker's."""

    def __init__(self, urls: list[str], rank: int, world_size: int, seed: int):
        self.urls, self.rank, self.world_size, self.seed = urls, rank, world_size, seed

    def __call__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for epoch in itertools.count():
            order = list(self.urls)
            random.Random(self.seed + epoch).shuffle(order)  # the same order on every rank
            mine = order[self.rank :: self.world_size][worker_id::num_workers]
            for url in mine:
                yield {"url": url}


class _SeededShuffle:
    """wds.shuffle with an rng seeded per (seed, rank, worker): reproducible, different on each stream."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        self.bufsize, self.seed, self.rank = bufsize, seed, rank

    def __call__(self, src: Iterable) -> Iterator:
        worker = get_worker_info()
        rng = random.Random(f"{self.seed}:{self.rank}:{worker.id if worker else 0}")
        # the stream runs across epochs, so the same rng keeps going and each epoch differs
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([image for image, _ in samples])  # (B, C, H, W)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)  # (B,)
    return images, labels


def _as_manifest(manifest: Manifest | str | Path) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


def _expected_by_url(manifest: Manifest, split: str) -> dict[str, dict]:
    return {str(path): shard for path, shard in zip(manifest.shard_paths(split), manifest.shards(split))}


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")


# --------------------------------------------------------------------------- training


def train_batches(
    manifest: Manifest | str | Path,
    *,
    image_size: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    micro_batch: int,
    rank: int,
    world_size: int,
    workers: int = 0,
    shuffle_buffer: int = 1000,
    seed: int = 0,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Infinite iterable of (images (B, C, H, W) float32, labels (B,) int64) from this rank's train shards."""
    manifest = _as_manifest(manifest)
    _check_rank(rank, world_size)
    if micro_batch < 1 or workers < 0 or shuffle_buffer < 1:
        raise ValueError(f"micro_batch {micro_batch}, workers {workers}, shuffle_buffer {shuffle_buffer}: "
                         "need micro_batch >= 1, workers >= 0, shuffle_buffer >= 1")
    shards = manifest.shards("train")
    streams = world_size * max(1, workers)
    # every (rank, worker) stream needs at least one shard per epoch, or that rank waits forever
    if len(shards) < streams:
        raise DataError(
            f"{manifest.path}: {len(shards)} train shard(s) cannot feed {world_size} rank(s) x "
            f"{max(1, workers)} worker(s); need at least {streams} shards: re-run prepare with "
            f"data.shard_max_samples <= {max(1, manifest.num_samples('train') // streams)}, or use fewer workers"
        )
    expected = _expected_by_url(manifest, "train")
    pipeline = wds.DataPipeline(
        _TrainShardSource(list(expected), rank, world_size, seed),
        _ReadShards(expected),
        _SeededShuffle(shuffle_buffer, seed, rank),
        wds.decode(_decode_image, handler=_raise_decoding_error),
        wds.to_tuple(_IMAGE_FIELDS, "cls"),
        wds.map_tuple(make_transform(image_size, in_channels, mean, std), None),
        wds.batched(micro_batch, collation_fn=_collate, partial=False),
    )
    if workers == 0:
        return pipeline
    # batch_size=None: batching already happened inside the pipeline
    return DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=True)


# --------------------------------------------------------------------------- evaluation


def iter_split(manifest: Manifest | str | Path, split: str) -> Iterator[tuple[str, Image.Image, int]]:
    """(key, PIL image in its stored mode, label) for every sample of `split`, in manifest order."""
    manifest = _as_manifest(manifest)
    expected = _expected_by_url(manifest, split)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(expected)),
        _ReadShards(expected),
        wds.decode(_decode_image, handler=_raise_decoding_error),
        wds.to_tuple("__key__", _IMAGE_FIELDS, "cls"),
    )
    return iter(pipeline)


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
    manifest = _as_manifest(manifest)
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
