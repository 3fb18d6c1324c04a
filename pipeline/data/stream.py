"""Exactly-once, resumable streaming of training shards across ranks and loader workers.

The plan of an epoch is a pure function of (manifest counts, seed, epoch, ranks, workers, batch):

* shards are shuffled with a generator seeded by (seed, epoch) and dealt, largest load first, to
  ``ranks x workers`` *streams* so that streams carry nearly equal sample counts;
* every stream yields the same number of batches ``n = min_s floor((count_s - allowance_s) / B)``,
  so every rank runs exactly ``workers x n`` steps per epoch and no collective ever waits for a
  rank that ran dry; the remainder (at most one batch plus the corruption allowance per stream,
  plus the imbalance between streams) is dropped and reported;
* within a stream, samples pass a seeded shuffle buffer; each sample is read once per epoch.

A stream reads its shards whole, hashing the bytes as they stream past: a shard whose size,
sha256 or sample count disagrees with the manifest is an error naming it, and a truncated tar can
never end an epoch silently. Image and label always come from the same key of the same shard.
A sample whose image does not decode is skipped and counted; a stream that skips more than its
allowance stops the job.

Position: each batch carries its stream's raw position (samples taken from the shuffle buffer,
decoded or skipped). `TrainStream.state()` holds (epoch, batches done, per-stream positions);
`load_state` makes the next batch exactly the one an uninterrupted run would have produced, by
re-reading the consumed raw samples without decoding them.

Resampled mode (very large datasets, or fewer shards than streams): each stream draws shards with
replacement from a generator seeded by (seed, epoch, stream); the epoch length is nominal.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.errors import DataError
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.plan import EpochPlan, plan_epoch, resampled_split
from pipeline.data.shard_format import ImageRefused, ShardSample, decode_image, read_shard
from pipeline.data.storage import open_url
from pipeline.launch.lifetime import die_with_parent
from pipeline.memory import tune_malloc

_PREFETCH = 2  # batches each loader worker keeps in flight (the DataLoader's prefetch_factor)


# --------------------------------------------------------------------------- one stream


def _shuffled(items: Iterator[ShardSample], bufsize: int, rng: random.Random) -> Iterator[ShardSample]:
    """A seeded shuffle buffer: each item comes out exactly once."""
    buf: list[ShardSample] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


@dataclass
class StreamSettings:
    """What every stream of a training job shares (picklable, sent to loader workers)."""

    urls: list[str]
    names: list[str]
    records: list[dict]
    num_classes: int
    transform: Callable
    micro_batch: int
    world_size: int
    rank: int
    workers: int
    seed: int
    shuffle_buffer: int
    max_corrupt_fraction: float
    resampled: bool
    where: str


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, where shared tensors live on Linux (None where there is none)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class _BatchSlots:
    """Shared-memory batch buffers that loader workers fill in place: (workers, depth, B, H, W, C) uint8.

    Through a worker's queue, a batch is pickled, written to a pipe, read and unpickled: five copies
    of every image (4.8 MB per 224 px batch of 32), which cost more than decoding on a machine with
    slow memory. Here a worker writes each image once into a slot and sends only the slot's index;
    the consumer copies the batch out and frees the slot, or (zero copy) uses the slot itself and
    frees it when it draws the next batch. A slot's flag is 1 from the moment a worker fills it until
    the consumer frees it; a worker waits for a free slot. It never has to: per worker, the
    DataLoader keeps at most `prefetch_factor` batches in flight, plus one held by a zero-copy
    consumer and the one being filled, which is `depth`. Created before the workers fork, so they
    share the same memory.
    """

    def __init__(self, workers: int, depth: int, shape: tuple[int, ...]):
        self.depth = depth
        self.buffers = torch.empty((workers, depth, *shape), dtype=torch.uint8).share_memory_()
        self.flags = torch.zeros((workers, depth), dtype=torch.int32).share_memory_()
        self._buffers, self._flags = self.buffers.numpy(), self.flags.numpy()

    def reset(self) -> None:
        """Free every slot (between epochs: the previous epoch's workers have exited)."""
        self._flags[:] = 0

    def acquire(self, worker: int, batch: int) -> np.ndarray:
        """The slot for a worker's `batch`-th batch, once the consumer has freed it (worker side)."""
        k = batch % self.depth
        parent = os.getppid()
        while self._flags[worker, k]:
            if os.getppid() != parent:  # the consumer is gone
                raise RuntimeError("loader worker: the training process exited")
            time.sleep(0.0005)
        return self._buffers[worker, k]

    def filled(self, worker: int, batch: int) -> tuple[int, int]:
        """Mark a worker's `batch`-th slot full; the index the consumer needs (worker side)."""
        k = batch % self.depth
        self._flags[worker, k] = 1
        return worker, k

    def take(self, slot: tuple[int, int], copy: bool) -> torch.Tensor:
        """A filled slot's batch (consumer side): copied out and the slot freed, or (copy=False) the
        slot itself, which stays taken until `release`."""
        worker, k = slot
        if not copy:
            return self.buffers[worker, k]
        images = self.buffers[worker, k].clone()
        self._flags[worker, k] = 0
        return images

    def release(self, slot: tuple[int, int]) -> None:
        """Free a slot handed out with copy=False (consumer side)."""
        self._flags[slot] = 0


class _EpochDataset(IterableDataset):
    """Yields this rank's batches of one epoch; in a DataLoader, each worker serves one stream."""

    def __init__(self, settings: StreamSettings, epoch: int, positions: dict[int, list[int]], batches_done: int,
                 slots: Optional["_BatchSlots"] = None):
        self.s, self.epoch, self.positions, self.batches_done = settings, epoch, positions, batches_done
        self.slots = slots

    def __iter__(self):
        s = self.s
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        self.worker = w if info else None
        # After a resume at batch k, the DataLoader starts again at worker 0, but the next batch is
        # due from stream k % W: rotate which stream each worker serves.
        local = (w + self.batches_done) % W
        sid = s.rank * W + local
        plan = plan_epoch([r["samples"] for r in s.records], seed=s.seed, epoch=self.epoch,
                          world_size=s.world_size, workers=s.workers, micro_batch=s.micro_batch,
                          max_corrupt_fraction=s.max_corrupt_fraction, resampled=s.resampled, where=s.where)
        pos, done, corrupt = self.positions.get(sid, [0, 0, 0])
        yield from self._stream(plan, sid, pos, done, corrupt)

    def _augment_rng(self, sid: int, batch: int) -> random.Random:
        """The augmentation RNG of one batch of a stream, seeded by (seed, epoch, stream, batch).

        Per batch, not per image: seeding a Mersenne Twister costs ~6 us, 4 % of decoding an MNIST
        image. A resume starts at a batch boundary, so a resumed batch draws exactly the
        augmentations the uninterrupted run drew.
        """
        return random.Random(f"{self.s.seed}:{self.epoch}:{sid}:{batch}:augment")

    def _raw(self, plan: EpochPlan, sid: int) -> Iterator[ShardSample]:
        s = self.s
        for i in plan.streams[sid]:
            # checked against its record before its first sample comes out (see shard_format)
            yield from read_shard(open_url(s.urls[i]), s.records[i], s.names[i], s.num_classes)

    def _stream(self, plan: EpochPlan, sid: int, pos: int, done: int, corrupt: int):
        s = self.s
        rng = random.Random(f"{s.seed}:{self.epoch}:{sid}:shuffle")
        raw = _shuffled(self._raw(plan, sid), s.shuffle_buffer, rng)
        for _ in range(pos):  # resume: re-read what was consumed, without decoding it
            next(raw)
        slots = self.slots if self.worker is not None else None
        images: list = []
        labels, keys = [], []
        corrupt_by_shard: dict[str, int] = {}
        aug = self._augment_rng(sid, done)
        out = slots.acquire(self.worker, done) if slots else None
        while done < plan.batches_per_stream:
            # Read the rest of the batch's samples in one burst, then decode them in another: on tiny
            # images, alternating tar parsing and decoding sample by sample costs ~10 us per sample
            # more than the two run back to back (each evicts the other's code and data from cache).
            burst = list(itertools.islice(raw, s.micro_batch - len(labels)))
            if not burst:
                raise DataError(f"{s.where}: stream {sid} ran out of samples in epoch {self.epoch} "
                                f"after {done} of {plan.batches_per_stream} batches")
            for sample in burst:
                pos += 1
                try:
                    image = decode_image(sample.image)
                except ImageRefused as e:  # undecodable or a bomb: skip the sample, count it, maybe stop
                    corrupt += 1
                    corrupt_by_shard[sample.shard] = corrupt_by_shard.get(sample.shard, 0) + 1
                    if corrupt > plan.allowance[sid]:
                        raise DataError(
                            f"{sample.shard}: sample {sample.key!r} .{sample.image_suffix} {e.reason}; {corrupt} "
                            f"corrupt image(s) in this stream exceed the allowed fraction {s.max_corrupt_fraction} "
                            f"({plan.allowance[sid]} of {plan.stream_samples[sid]})"
                        ) from None
                    continue
                pixels = s.transform.pixels(image, aug)
                if out is not None:
                    out[len(labels)] = pixels  # straight into shared memory: the batch's only copy
                else:
                    images.append(pixels)
                labels.append(sample.label)
                keys.append(f"{sample.shard}/{sample.key}")
                if len(labels) == s.micro_batch:
                    done += 1
                    batch = {"labels": np.asarray(labels, dtype=np.int64), "keys": keys, "stream": sid,
                             "position": [pos, done, corrupt], "corrupt": dict(corrupt_by_shard)}
                    if out is not None:
                        batch["slot"] = slots.filled(self.worker, done - 1)
                    else:
                        batch["images"] = np.stack(images)
                    yield batch
                    images, labels, keys, corrupt_by_shard = [], [], [], {}
                    aug = self._augment_rng(sid, done)
                    if slots and done < plan.batches_per_stream:
                        out = slots.acquire(self.worker, done)


# --------------------------------------------------------------------------- what training iterates


@dataclass
class StreamState:
    """A training stream's position: part of every training checkpoint."""

    epoch: int = 0
    batches_done: int = 0
    positions: dict[int, list[int]] = field(default_factory=dict)
    """stream id -> [raw samples consumed, batches yielded, corrupt samples skipped]."""

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "positions": {str(k): v for k, v in self.positions.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamState":
        return cls(int(d["epoch"]), int(d["batches_done"]), {int(k): list(v) for k, v in d["positions"].items()})


def _as_is(batch):
    """DataLoader collate for ready-made batches: keep numpy arrays (see _EpochDataset._stream)."""
    return batch


def _init_worker(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to their rank, which checkpoints and then stops them; die
    with their rank (not 5 s later, when DataLoader's watchdog would notice); and keep freed image
    buffers for reuse (see pipeline/memory.py; inherited on fork, set again here)."""
    tune_malloc()
    die_with_parent()

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class TrainStream:
    """This rank's training batches, epoch after epoch, with a checkpointable position.

    Iterating yields dicts with "images" (B, H, W, C) uint8 pixels (normalize them where they land,
    with the transform's `normalize`, which also makes them (B, C, H, W)), "labels" (B,), "keys" (B shard/key strings) and "corrupt"
    (per-shard counts of skipped images since the previous batch).
    """

    def __init__(self, settings: StreamSettings, state: StreamState | None = None, zero_copy: bool = False):
        self.settings = settings
        self.state = state or StreamState()
        self.zero_copy = zero_copy
        """With loader workers: a batch's "images" is the workers' shared buffer itself, valid until the
        next batch is drawn (for a consumer that uses each batch at once, as training does); saves
        allocating and copying every batch (about a fifth of a core at 224 px)."""
        self._batch_slots: Optional[_BatchSlots] = None
        counts = [r["samples"] for r in settings.records]
        self.plan0 = plan_epoch(counts, seed=settings.seed, epoch=0, world_size=settings.world_size,
                                workers=settings.workers, micro_batch=settings.micro_batch,
                                max_corrupt_fraction=settings.max_corrupt_fraction, resampled=settings.resampled,
                                where=settings.where)

    @property
    def steps_per_epoch(self) -> int:
        """Batches every rank draws per epoch (the same on every rank)."""
        return self.plan0.batches_per_stream * max(1, self.settings.workers)

    @property
    def dropped_per_epoch(self) -> int:
        """Training samples left out of each epoch to keep ranks equal (0 in resampled mode)."""
        return self.plan0.dropped

    def _slots(self) -> Optional[_BatchSlots]:
        """Shared batch buffers for the loader workers, when the transform says its output shape."""
        shape = getattr(self.settings.transform, "output_shape", None)
        if self.settings.workers < 1 or shape is None:
            return None
        if self._batch_slots is None:
            depth, batch_shape = _PREFETCH + 2, (self.settings.micro_batch, *shape)
            need = self.settings.workers * depth * math.prod(batch_shape)
            free = _shm_free_bytes()
            if free is not None and free < need:
                # a full /dev/shm makes a worker die of SIGBUS mid-epoch: say so now, and keep going
                # the slow way (batches pickled through the workers' queues)
                warnings.warn(f"loader: the shared batch buffers need {_size(need)} but /dev/shm has "
                              f"{_size(free)} free; handing batches over through the worker queues "
                              "instead (slower). In a container, raise it (docker run --shm-size=8g).", stacklevel=2)
                return None
            self._batch_slots = _BatchSlots(self.settings.workers, depth, batch_shape)
        self._batch_slots.reset()
        return self._batch_slots

    def __iter__(self) -> Iterator[dict]:
        while True:
            st = self.state
            slots = self._slots()
            dataset = _EpochDataset(self.settings, st.epoch, dict(st.positions), st.batches_done, slots)
            if self.settings.workers > 0:
                batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.settings.workers,
                                          persistent_workers=False, worker_init_fn=_init_worker,
                                          collate_fn=_as_is, prefetch_factor=_PREFETCH))
            else:
                batches = iter(dataset)
            held = None
            while st.batches_done < self.steps_per_epoch:
                if held is not None:  # the consumer is done with the previous zero-copy batch
                    slots.release(held)
                    held = None
                batch = next(batches)
                if "slot" in batch:
                    slot = batch.pop("slot")
                    batch["images"] = slots.take(slot, copy=not self.zero_copy)
                    held = None if not self.zero_copy else slot
                else:
                    batch["images"] = torch.from_numpy(batch["images"])  # no copy
                batch["labels"] = torch.from_numpy(batch["labels"])
                st.positions[batch["stream"]] = batch["position"]
                st.batches_done += 1
                yield batch
            del batches
            self.state = StreamState(epoch=st.epoch + 1)


def shard_urls(manifest: Manifest, split: str, base_url: Optional[str] = None) -> list[str]:
    """Where each shard of `split` is read from: under `base_url` when set, else beside the manifest
    (a local path, or a URL for a manifest loaded from s3:// or http(s)://)."""
    if base_url:
        return [f"{base_url.rstrip('/')}/{s['name']}" for s in manifest.shards(split)]
    return manifest.shard_locations(split)


def train_stream(manifest: Manifest | str | Path, *, transform: Callable, micro_batch: int, rank: int,
                 world_size: int, workers: int = 0, shuffle_buffer: int = 1000, seed: int = 0,
                 sampling: str = "exact", max_corrupt_fraction: float = 0.0, base_url: Optional[str] = None,
                 state: StreamState | None = None, zero_copy: bool = False) -> TrainStream:
    """This rank's `TrainStream` over the train split; `transform.pixels(image, rng)` -> uint8 (H, W, C)."""
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    records = manifest.shards("train")
    nstreams = world_size * max(1, workers)
    resampled = resampled_split(sampling, len(records), nstreams)
    settings = StreamSettings(
        urls=shard_urls(manifest, "train", base_url), names=[r["name"] for r in records], records=records,
        num_classes=manifest.num_classes, transform=transform, micro_batch=micro_batch, world_size=world_size,
        rank=rank, workers=workers, seed=seed, shuffle_buffer=shuffle_buffer,
        max_corrupt_fraction=max_corrupt_fraction, resampled=resampled, where=str(manifest.path),
    )
    return TrainStream(settings, state, zero_copy=zero_copy)
