"""The plan of an epoch: which train shards each stream (rank x loader worker) reads, and how many
batches every stream yields. Torch-free, so the launching process checks the plan before any rank
starts (`check_train_plan`) with the same arithmetic every rank runs (`pipeline.data.stream`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from pipeline.config import TrainConfig
from pipeline.data.errors import DataError
from pipeline.data.manifest import Manifest


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each stream reads in one epoch, and how many batches every stream yields."""

    epoch: int
    streams: list[list[int]]
    """Shard indices per stream; stream id = rank * workers + worker."""
    stream_samples: list[int]
    batches_per_stream: int
    allowance: list[int]
    """Corrupt samples each stream may skip before the job stops."""
    dropped: int
    """Training samples not seen this epoch (so that every rank runs the same number of steps)."""


def plan_epoch(counts: Sequence[int], *, seed: int, epoch: int, world_size: int, workers: int, micro_batch: int,
               max_corrupt_fraction: float = 0.0, resampled: bool = False, where: str = "manifest",
               keys: str = "") -> EpochPlan:
    """The deterministic plan of `epoch`; raises DataError when the shards cannot feed every stream
    (`keys`: the recipe's section the fix names, e.g. "pretrain.")."""
    nstreams = world_size * max(1, workers)
    total = sum(counts)
    if resampled:
        nominal = total // nstreams
        streams: list[list[int]] = []
        for s in range(nstreams):
            rng = random.Random(f"{seed}:{epoch}:{s}:resampled")
            want = nominal + math.ceil(max_corrupt_fraction * nominal)
            picked, have = [], 0
            while have < max(want, 1):
                i = rng.randrange(len(counts))
                picked.append(i)
                have += counts[i]
            streams.append(picked)
    else:
        if len(counts) < nstreams:
            raise DataError(
                f"{where}: {len(counts)} train shard(s) cannot feed {world_size} rank(s) x {max(1, workers)} "
                f"loader worker(s): need at least {nstreams} shards. Re-run prepare with "
                f"data.shard_max_samples <= {max(1, total // nstreams)}, use fewer {keys}workers, or set "
                f"{keys}sampling=auto (resampled when the shards are too few)"
            )
        order = list(range(len(counts)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        streams = [[] for _ in range(nstreams)]
        loads = [0] * nstreams
        # Largest first into the least-loaded stream: near-equal streams, deterministic ties.
        for i in sorted(order, key=lambda i: -counts[i]):
            s = min(range(nstreams), key=lambda s: (loads[s], s))
            streams[s].append(i)
            loads[s] += counts[i]
        for s in streams:  # read order within a stream follows the epoch's shuffle
            s.sort(key=order.index)
    stream_samples = [sum(counts[i] for i in s) for s in streams]
    if resampled:
        stream_samples = [min(n, total // nstreams + math.ceil(max_corrupt_fraction * (total // nstreams)))
                          for n in stream_samples]
    allowance = [math.floor(max_corrupt_fraction * n) for n in stream_samples]
    n = min((c - a) // micro_batch for c, a in zip(stream_samples, allowance))
    if n < 1:
        raise DataError(f"{where}: {total} training samples over {nstreams} streams (ranks x workers) leave "
                        f"fewer than micro_batch={micro_batch} samples per stream; lower {keys}micro_batch or "
                        f"{keys}workers")
    used = n * micro_batch * nstreams
    return EpochPlan(epoch, streams, stream_samples, n, allowance, max(0, total - used) if not resampled else 0)


def resampled_split(sampling: str, shards: int, streams: int) -> bool:
    """Whether the train split is read with replacement: asked for, or `auto` with too few shards."""
    return sampling == "resampled" or (sampling == "auto" and shards < streams)


def check_train_plan(manifest: Manifest, train: TrainConfig, keys: str) -> None:
    """Raise, in the launching process, the DataError every rank of a `train` stage would raise at
    its first batch (too few shards or samples for ranks x workers x micro_batch), before any rank
    starts: about a minute of torchrun, DeepSpeed and engine start-up on two ranks here. `keys`:
    the recipe section the fix names ("pretrain.")."""
    records = manifest.shards("train")
    plan_epoch([r["samples"] for r in records], seed=train.seed, epoch=0, world_size=train.ranks,
               workers=train.workers, micro_batch=train.micro_batch, max_corrupt_fraction=train.max_corrupt_fraction,
               resampled=resampled_split(train.sampling, len(records), train.ranks * max(1, train.workers)),
               where=str(manifest.path), keys=keys)
