"""The training stream: exactly once per epoch across ranks and workers, equal steps per rank,
exact mid-epoch resume, and every corruption behaviour — on real shards read through webdataset."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from collections import Counter

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data.errors import DataError
from pipeline.data.manifest import load_manifest
from pipeline.data.prepare import prepare_dataset
from pipeline.data.stream import StreamState, plan_epoch, train_stream
from pipeline.data.transforms import TrainTransform

TRANSFORM = TrainTransform(image_size=8, in_channels=1, mean=[0.5], std=[0.5])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """sklearn's real 8x8 digits: 600 images, 540 train samples in 9 shards of <= 60."""
    out = tmp_path_factory.mktemp("digits")
    return prepare_dataset(DataConfig(source="digits", limit=600, shard_max_samples=60), out)


@pytest.fixture
def copy(digits, tmp_path):
    shutil.copytree(digits.parent, tmp_path / "d")
    return tmp_path / "d" / "manifest.json"


def take_epoch(manifest, rank, world, workers, batch=16, **kw):
    stream = train_stream(manifest, transform=TRANSFORM, micro_batch=batch, rank=rank, world_size=world,
                          workers=workers, shuffle_buffer=50, seed=7, **kw)
    it = iter(stream)
    return stream, [next(it) for _ in range(stream.steps_per_epoch)]


def all_train_keys(manifest_path):
    m = load_manifest(manifest_path)
    keys = []
    for path, rec in zip(m.shard_paths("train"), m.shards("train")):
        with tarfile.open(path) as tar:
            names = {n.rsplit(".", 1)[0] for n in tar.getnames()}
        keys += [f"{rec['name']}/{k}" for k in names]
    return keys


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_see_every_sample_once_per_epoch_with_equal_steps(digits, workers):
    streams = [take_epoch(digits, r, 2, workers) for r in range(2)]
    steps = {len(batches) for _, batches in streams}
    assert len(steps) == 1  # every rank runs the same number of steps
    seen = Counter(k for _, batches in streams for b in batches for k in b["keys"])
    assert max(seen.values()) == 1  # nothing twice
    everything = all_train_keys(digits)
    dropped = streams[0][0].dropped_per_epoch
    assert len(seen) == len(everything) - dropped and set(seen) <= set(everything)
    assert dropped < 2 * max(1, workers) * 16 + 60  # at most ~a batch per stream plus imbalance
    for _, batches in streams:  # labels travel with their own image
        b = batches[0]
        assert b["images"].shape == (16, 8, 8, 1) and b["images"].dtype == torch.uint8 and b["labels"].shape == (16,)


def test_epochs_differ_and_are_deterministic(digits):
    s1 = train_stream(digits, transform=TRANSFORM, micro_batch=16, rank=0, world_size=1, seed=7, shuffle_buffer=50)
    s2 = train_stream(digits, transform=TRANSFORM, micro_batch=16, rank=0, world_size=1, seed=7, shuffle_buffer=50)
    n = s1.steps_per_epoch
    a = [b["keys"] for _, b in zip(range(2 * n), s1)]
    b = [b["keys"] for _, b in zip(range(2 * n), s2)]
    assert a == b  # same (seed, epoch) -> same order
    assert a[:n] != a[n:]  # a new epoch is a new order
    e0, e1 = sum(a[:n], []), sum(a[n:], [])
    assert len(set(e0)) == len(e0) == len(set(e1))  # each once per epoch
    assert len(set(e0) ^ set(e1)) <= 2 * s1.dropped_per_epoch  # only the dropped remainder differs


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_has_no_repeat_and_no_gap(digits, workers):
    k = 5
    full = take_epoch(digits, 1, 2, workers)[1]
    stream = train_stream(digits, transform=TRANSFORM, micro_batch=16, rank=1, world_size=2, workers=workers,
                          shuffle_buffer=50, seed=7)
    it = iter(stream)
    first = [next(it) for _ in range(k)]
    saved = json.loads(json.dumps(stream.state.to_dict()))  # as stored in a checkpoint
    del it
    resumed = train_stream(digits, transform=TRANSFORM, micro_batch=16, rank=1, world_size=2, workers=workers,
                           shuffle_buffer=50, seed=7, state=StreamState.from_dict(saved))
    it = iter(resumed)
    rest = [next(it) for _ in range(len(full) - k)]
    assert [b["keys"] for b in first + rest] == [b["keys"] for b in full]
    assert all((a["images"] == b["images"]).all() for a, b in zip(first + rest, full))


def test_too_few_shards_is_an_error_that_says_how_many_or_resampled(digits):
    with pytest.raises(DataError, match="need at least 12 shards"):
        train_stream(digits, transform=TRANSFORM, micro_batch=8, rank=0, world_size=2, workers=6)
    stream = train_stream(digits, transform=TRANSFORM, micro_batch=8, rank=0, world_size=2, workers=6,
                          sampling="auto")
    # resampled: each of the 12 streams draws a nominal share of the train split, in whole batches
    nominal = load_manifest(digits).num_samples("train") // 12
    assert stream.settings.resampled and stream.steps_per_epoch == (nominal // 8) * 6
    batch = next(iter(stream))
    assert batch["images"].shape[0] == 8


def test_plan_is_balanced_and_covers_every_shard_once():
    counts = [60] * 8 + [35]
    plan = plan_epoch(counts, seed=1, epoch=3, world_size=2, workers=2, micro_batch=10)
    assert sorted(i for s in plan.streams for i in s) == list(range(9))
    assert max(plan.stream_samples) - min(plan.stream_samples) <= 60
    assert plan.dropped == sum(counts) - plan.batches_per_stream * 10 * 4


def _rewrite_member(manifest_path, shard_index, edit):
    """Rewrite one train shard with `edit(name, data) -> (name, data) | None`, keeping the manifest as is."""
    m = load_manifest(manifest_path)
    path = m.shard_paths("train")[shard_index]
    members = []
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            out = edit(info.name, tar.extractfile(info).read())
            if out is not None:
                members.append(out)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return m.shards("train")[shard_index]["name"]


def _fix_manifest(manifest_path, shard_name):
    """Make the manifest agree with a rewritten shard's bytes (so only the content is wrong)."""
    import hashlib

    info = json.loads(manifest_path.read_text())
    for rec in info["splits"]["train"]["shards"]:
        if rec["name"] == shard_name:
            data = (manifest_path.parent / shard_name).read_bytes()
            rec["bytes"], rec["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(info))


def _one_epoch(manifest, **kw):
    stream = train_stream(manifest, transform=TRANSFORM, micro_batch=16, rank=0, world_size=1, shuffle_buffer=50,
                          seed=7, **kw)
    return stream, [b for _, b in zip(range(stream.steps_per_epoch), stream)]


def test_corrupt_image_is_skipped_and_counted(copy):
    corrupted = []

    def garble(name, data):
        if name.endswith(".png") and len(corrupted) < 2:
            corrupted.append(name.rsplit(".", 1)[0])
            return name, data[:20] + b"\x00" * 40  # a PNG header followed by garbage
        return name, data

    shard = _rewrite_member(copy, 0, garble)
    _fix_manifest(copy, shard)
    stream, batches = _one_epoch(copy, max_corrupt_fraction=0.01)
    counted = sum(n for b in batches for n in b["corrupt"].values())
    assert counted == 2 and all(shard in b["corrupt"] for b in batches if b["corrupt"])
    seen = {k for b in batches for k in b["keys"]}
    assert not any(f"{shard}/{k}" in seen for k in corrupted)
    with pytest.raises(DataError, match="exceed the allowed fraction"):
        _one_epoch(copy, max_corrupt_fraction=0.0)


def test_mismatched_hash_names_the_shard(copy):
    info = json.loads(copy.read_text())
    info["splits"]["train"]["shards"][2]["sha256"] = "f" * 64
    copy.write_text(json.dumps(info))
    name = info["splits"]["train"]["shards"][2]["name"]
    with pytest.raises(DataError, match=f"{name}: sha256"):
        _one_epoch(copy)


def test_truncated_shard_never_ends_silently(copy):
    m = load_manifest(copy)
    path = m.shard_paths("train")[1]
    data = path.read_bytes()
    path.write_bytes(data[: 512 * 20])  # cut exactly at a tar block boundary
    with pytest.raises(DataError, match=m.shards("train")[1]["name"]):
        _one_epoch(copy)


def test_missing_label_member_is_an_error_never_a_mispairing(copy):
    dropped = []

    def drop_one_label(name, data):
        if name.endswith(".cls") and not dropped:
            dropped.append(name)
            return None
        return name, data

    shard = _rewrite_member(copy, 0, drop_one_label)
    _fix_manifest(copy, shard)
    with pytest.raises(DataError, match=r"no \.cls label.*image and label must share a key"):
        _one_epoch(copy)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile_including_long_names(tmp_path, fmt):
    from pipeline.data.shard_format import tar_members

    members = {"a.cls": b"3", "dir/b.png": b"\x89PNG" + bytes(700), ("x" * 120) + "/long.cls": b"7",
               "y" * 150 + ".png": bytes(513)}
    if fmt == tarfile.USTAR_FORMAT:
        members.pop("y" * 150 + ".png")  # ustar cannot store a 150-character base name
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert dict(tar_members(f, "t.tar")) == members
    # a stream cut before the end marker is an error, never a shorter list of members (a cut in the
    # trailing padding loses nothing; read_shard still catches it by size and sha256)
    data = path.read_bytes()
    for cut in (100, 512, 1024, 1500, 2048, 2560):  # all inside the members, before the end marker
        with pytest.raises(DataError, match="t.tar"):
            list(tar_members(io.BytesIO(data[:cut]), "t.tar"))


def test_tar_reader_rejects_a_damaged_header_and_reads_short_reads(tmp_path):
    """A flipped byte in any header field is caught by the checksum before it can mis-pair members;
    a stream that returns a few bytes per read (pipes, sockets) reads the same members."""
    from pipeline.data.shard_format import tar_members

    members = {f"{i:04d}.{ext}": bytes([i]) * (300 + i) for i in range(5) for ext in ("png", "cls")}
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()

    class Trickle(io.RawIOBase):
        def __init__(self, data):
            self.f = io.BytesIO(data)

        def read(self, n=-1):
            return self.f.read(min(n, 97))

    assert dict(tar_members(Trickle(data), "t.tar")) == members
    for offset in (0, 5, 130, 157, 300):  # name, name, size, type flag, inside the ustar fields
        for header_at in (0, 1024, 4096):  # the first, second and fifth member's headers
            damaged = bytearray(data)
            damaged[header_at + offset] ^= 0x04
            with pytest.raises(DataError, match="t.tar: damaged tar header"):
                list(tar_members(io.BytesIO(bytes(damaged)), "t.tar"))


class _NoShapeTransform:
    """The same pixels, but no output_shape: the stream falls back to pickling batches through the queue."""

    def pixels(self, image, rng):
        return TRANSFORM.pixels(image, rng)


def test_workers_fill_shared_slots_and_zero_copy_batches_match(digits):
    """With loader workers, batches come through shared-memory slots: copied out by default (safe to
    keep), or zero-copy (valid until the next draw, as training uses them); both give exactly the
    pixels, labels and keys of batches pickled through the workers' queues, over two epochs (slots
    are reused many times over)."""
    def run(transform, zero_copy):
        stream = train_stream(digits, transform=transform, micro_batch=16, rank=0, world_size=1, workers=2,
                              shuffle_buffer=50, seed=3, zero_copy=zero_copy)
        out = []
        for b in itertools.islice(stream, 2 * stream.steps_per_epoch):
            out.append((b["keys"], b["labels"].clone(), b["images"].clone()))  # clone: zero-copy is reused
        return stream, out

    stream, reference = run(_NoShapeTransform(), False)
    assert stream._batch_slots is None
    stream, copied = run(TRANSFORM, False)
    assert stream._batch_slots is not None  # the workers really went through the slots
    _, zero = run(TRANSFORM, True)
    for (k0, l0, i0), (k1, l1, i1), (k2, l2, i2) in zip(reference, copied, zero, strict=True):
        assert k0 == k1 == k2 and torch.equal(l0, l1) and torch.equal(l0, l2)
        assert torch.equal(i0, i1) and torch.equal(i0, i2)


def test_too_little_shared_memory_falls_back_to_the_queues_with_a_warning(digits, monkeypatch):
    """A /dev/shm too small for the batch buffers (a container's 64 MB default) must not kill a worker
    with SIGBUS mid-epoch: the stream says how much it needs and hands batches through the queues."""
    import pipeline.data.stream as stream_module

    monkeypatch.setattr(stream_module, "_shm_free_bytes", lambda: 1024)
    stream = train_stream(digits, transform=TRANSFORM, micro_batch=16, rank=0, world_size=1, workers=2,
                          shuffle_buffer=50, seed=3)
    with pytest.warns(UserWarning, match=r"need 8\.0 KiB but /dev/shm has 1\.0 KiB free.*--shm-size"):
        batch = next(iter(stream))
    assert stream._batch_slots is None and batch["images"].shape == (16, 8, 8, 1)
