"""Data package: sources, shards, manifest, loaders. CPU only, real images, tiny shards in tmp_path."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.errors import DataError
from pipeline.data.eval_stream import eval_batches, iter_split
from pipeline.data.manifest import load_manifest, verify_manifest
from pipeline.data.prepare import prepare_dataset
from pipeline.data.sources import Sample, load_source, split_train_val
from pipeline.data.transforms import make_transform

GRAY = dict(image_size=16, in_channels=1, mean=[0.5], std=[0.5])


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """sklearn digits (1,797 images) prepared into 200-sample shards; tests copy it before editing."""
    out = tmp_path_factory.mktemp("digits")
    prepare_dataset(DataConfig(source="digits", shard_max_samples=200, val_fraction=0.1, seed=0), out)
    return out


@pytest.fixture
def digits_copy(digits_dir, tmp_path) -> Path:
    return Path(shutil.copytree(digits_dir, tmp_path / "copy"))


def read_shards_with_webdataset(paths: list[Path]) -> list[tuple[str, np.ndarray, int]]:
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(p) for p in paths]),
        wds.tarfile_to_samples(),
        wds.decode("l8"),
        wds.to_tuple("__key__", "png;jpg", "cls"),
    )
    return list(pipeline)


# --------------------------------------------------------------------------- prepare + manifest


def test_digits_manifest_fields(digits_dir):
    info = json.loads((digits_dir / "manifest.json").read_text())
    assert info["format"] == "vitpipe.shards/1"
    assert info["source"] == "digits" and info["num_classes"] == 10
    assert info["class_names"] == [str(d) for d in range(10)]
    assert info["image_size"] == [8, 8] and info["channels"] == 1 and info["image_format"] == "png"
    assert info["seed"] == 0 and info["val_fraction"] == 0.1 and info["created"]
    train, val = info["splits"]["train"], info["splits"]["val"]
    assert train["samples"] + val["samples"] == 1797
    assert 170 <= val["samples"] <= 190
    assert [s["name"] for s in train["shards"]] == [f"shards/train-{i:06d}.tar" for i in range(len(train["shards"]))]
    assert all(s["samples"] <= 200 and len(s["sha256"]) == 64 for s in train["shards"] + val["shards"])
    m = load_manifest(digits_dir)  # the folder works as well as the file
    assert m.num_samples("train") == train["samples"] and len(m.shard_paths("train")) == 9
    assert all(p.is_file() for p in m.shard_paths("val"))
    verify_manifest(m)
    with pytest.raises(DataError, match="no split 'test'"):
        m.shard_paths("test")


def test_shards_round_trip_every_sample_once(digits_dir):
    source = load_source(DataConfig(source="digits"))
    expected = {s.key: s for s in source.samples}
    m = load_manifest(digits_dir)
    read = read_shards_with_webdataset(m.shard_paths("train") + m.shard_paths("val"))
    counts = Counter(key for key, _, _ in read)
    assert set(counts) == set(expected) and set(counts.values()) == {1}
    for key, pixels, label in read:
        assert label == expected[key].label
        np.testing.assert_array_equal(pixels, expected[key].array)  # PNG is lossless


def test_train_and_val_are_disjoint_and_stratified(digits_dir):
    m = load_manifest(digits_dir)
    train = {k for k, _, _ in iter_split(m, "train")}
    val_items = list(iter_split(m, "val"))
    val = {k for k, _, _ in val_items}
    assert not train & val and len(train) + len(val) == 1797
    assert set(Counter(label for _, _, label in val_items)) == set(range(10))


def test_split_small_classes():
    one = np.zeros((2, 2), np.uint8)
    samples = [Sample(f"a{i}", 0, array=one) for i in range(2)] + [Sample("b0", 1, array=one)]
    samples += [Sample(f"c{i}", 2, array=one) for i in range(10)]
    train, val = split_train_val(samples, 0.1, seed=3)
    val_labels = Counter(s.label for s in val)
    assert val_labels == {0: 1, 2: 1}  # a 2-sample class still gets a val image; a lone one does not
    assert {s.key for s in train}.isdisjoint(s.key for s in val)
    assert split_train_val(samples, 0.1, seed=3) == (train, val)


def test_prepare_is_deterministic(tmp_path):
    cfg = DataConfig(source="mnist5k", limit=300, shard_max_samples=100, seed=1)
    a = load_manifest(prepare_dataset(cfg, tmp_path / "a"))
    b = load_manifest(prepare_dataset(cfg, tmp_path / "b"))
    assert a.splits == b.splits
    for split in ("train", "val"):
        for pa, pb in zip(a.shard_paths(split), b.shard_paths(split)):
            assert pa.read_bytes() == pb.read_bytes()
    # the limit is class-stratified: 5,000 MNIST digits are 500 per class
    labels = Counter(label for split in ("train", "val") for _, _, label in iter_split(a, split))
    assert labels == {d: 30 for d in range(10)}
    assert a.image_size == [28, 28] and a.channels == 1


def test_rerun_with_fewer_shards_removes_stale_ones(tmp_path):
    prepare_dataset(DataConfig(source="mnist5k", limit=200, shard_max_samples=50), tmp_path)
    m = load_manifest(prepare_dataset(DataConfig(source="mnist5k", limit=200, shard_max_samples=500), tmp_path))
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["train-000000.tar", "val-000000.tar"]
    verify_manifest(m)


# --------------------------------------------------------------------------- folder source


def make_folder_tree(root: Path) -> dict[str, bytes]:
    """Real photos from scikit-learn plus MNIST digits saved as PNG, in class folders; returns file bytes."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    (root / "photos").mkdir(parents=True)
    china = Path(photos.filenames[0]).read_bytes()
    (root / "photos" / "china.jpg").write_bytes(china)  # original JPEG bytes
    Image.fromarray(photos.images[1]).resize((160, 107)).save(root / "photos" / "flower.PNG")
    Image.fromarray(photos.images[1]).resize((32, 24)).save(root / "photos" / "flower small.bmp")
    mnist = load_source(DataConfig(source="mnist5k", limit=100)).samples
    for digit in ("3", "7"):
        nested = root / f"digit_{digit}" / "batch1"
        nested.mkdir(parents=True)
        for s in [s for s in mnist if str(s.label) == digit][:4]:
            Image.fromarray(s.array).save(nested / f"{s.key}.png")
    (root / "digit_3" / "notes.txt").write_text("not an image, ignored")
    return {"china": china}


def test_folder_source_round_trip(tmp_path):
    originals = make_folder_tree(tmp_path / "images")
    cfg = DataConfig(source="folder", root=str(tmp_path / "images"), val_fraction=0.25, shard_max_samples=4)
    source = load_source(cfg)
    assert source.class_names == ["digit_3", "digit_7", "photos"]
    assert Counter(s.label for s in source.samples) == {0: 4, 1: 4, 2: 3}
    china = next(s for s in source.samples if "china" in s.key)
    assert china.data == originals["china"] and china.ext == "jpg"
    m = load_manifest(prepare_dataset(cfg, tmp_path / "out"))
    verify_manifest(m)
    assert m.image_size is None and m.channels == 3  # mixed sizes; photos are colour
    items = [item for split in ("train", "val") for item in iter_split(m, split)]
    assert sorted(k for k, _, _ in items) == sorted(s.key for s in source.samples)
    by_key = {k: (image, label) for k, image, label in items}
    assert by_key[china.key][0].size == (640, 427) and by_key[china.key][1] == 2
    small = next(k for k in by_key if "small" in k)
    assert by_key[small][0].size == (32, 24)  # the .bmp was transcoded to PNG and still decodes
    stored = read_shards_with_webdataset(m.shard_paths("train") + m.shard_paths("val"))
    assert len(stored) == 11


def test_folder_source_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(DataConfig(source="folder", root=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="data.root"):
        load_source(DataConfig(source="folder", root=None))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError, match="no class folders") as e:
        load_source(DataConfig(source="folder", root=str(root)))
    assert str(root) in str(e.value)
    (root / "cat").mkdir()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(root / "cat" / "ok.png")
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="class folder has no images") as e:
        load_source(DataConfig(source="folder", root=str(root)))
    assert str(root / "dog") in str(e.value)
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG garbage, not really an image" * 10)
    with pytest.raises(DataError, match="not a readable image") as e:
        load_source(DataConfig(source="folder", root=str(root)))
    assert str(bad) in str(e.value)


def test_empty_dataset_is_an_error(tmp_path, monkeypatch):
    from pipeline.data import sources

    monkeypatch.setattr(sources, "_load_digits", lambda: sources.Source(class_names=["0"], samples=[]))
    with pytest.raises(DataError, match="empty"):
        prepare_dataset(DataConfig(source="digits"), tmp_path)
    assert not (tmp_path / "manifest.json").exists()


# --------------------------------------------------------------------------- verification


def edit_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def test_verify_catches_mismatched_hash(digits_copy):
    edit_manifest(digits_copy, lambda i: i["splits"]["val"]["shards"][0].update(sha256="0" * 64))
    with pytest.raises(DataError, match=r"val-000000\.tar: sha256 is"):
        verify_manifest(load_manifest(digits_copy))


def test_verify_catches_truncated_shard(digits_copy):
    shard = digits_copy / "shards" / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"train-000003\.tar: size is 5000 bytes"):
        verify_manifest(load_manifest(digits_copy))


def test_verify_catches_wrong_count(digits_copy):
    def wrong(info):
        info["splits"]["train"]["shards"][1]["samples"] += 1
        info["splits"]["train"]["samples"] += 1

    edit_manifest(digits_copy, wrong)
    with pytest.raises(DataError, match=r"train-000001\.tar: holds 200 samples but .* records 201"):
        verify_manifest(load_manifest(digits_copy))


def test_verify_catches_corrupt_header_of_same_size(digits_copy):
    shard = digits_copy / "shards" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[4096 : 4096 + 512] = b"\xff" * 512  # a member header in the middle (tarfile just stopped there)
    shard.write_bytes(bytes(data))
    # the one shard reader names the damage instead of reporting a short count
    with pytest.raises(DataError, match=r"train-000000\.tar: damaged tar header"):
        verify_manifest(load_manifest(digits_copy), check_hashes=False)


def test_manifest_schema_errors(digits_copy):
    edit_manifest(digits_copy, lambda i: i.update(num_classes=3))
    with pytest.raises(DataError, match="num_classes is 3 but class_names has 10"):
        load_manifest(digits_copy)
    edit_manifest(digits_copy, lambda i: i.update(num_classes=10, format="other/9"))
    with pytest.raises(DataError, match="format is 'other/9'"):
        load_manifest(digits_copy)
    def escape(info):
        info["format"] = "vitpipe.shards/1"
        info["splits"]["val"]["shards"][0]["name"] = "../x.tar"

    edit_manifest(digits_copy, escape)
    with pytest.raises(DataError, match=r"splits\.val\.shards\[0\]\.name"):
        load_manifest(digits_copy)
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(digits_copy / "nowhere")


# --------------------------------------------------------------------------- loaders


def test_make_transform_scales_normalizes_and_resizes():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    image = Image.fromarray(pixels)
    x = make_transform(8, 1, mean=[0.5], std=[0.25])(image)
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], (torch.from_numpy(pixels).float() / 255 - 0.5) / 0.25)
    rgb = make_transform(8, 3, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])(image)
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb[0], rgb[2])
    big = make_transform(16, 1, mean=[0.0], std=[1.0])(image)
    expected = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    torch.testing.assert_close(big[0], torch.from_numpy(expected))


def test_loader_surfaces_a_corrupt_shard_of_the_right_size(digits_copy):
    m = load_manifest(digits_copy)
    shard = m.shard_paths("val")[0]
    data = bytearray(shard.read_bytes())
    data[4096 : 4096 + 512] = b"\xff" * 512
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val-000000\.tar: (damaged tar header|read \d+ samples|sha256)"):
        list(iter_split(m, "val"))


def test_eval_batches_world_two_cover_every_sample_once(digits_dir):
    m = load_manifest(digits_dir)
    n = m.num_samples("val")
    transform = make_transform(**GRAY)
    reference = [(transform(image), label) for _, image, label in iter_split(m, "val")]
    per_rank = [list(eval_batches(m, "val", **GRAY, batch_size=16, rank=r, world_size=2)) for r in range(2)]
    expected_batches = -(-(-(-n // 2)) // 16)
    assert [len(b) for b in per_rank] == [expected_batches, expected_batches]
    for rank, batches in enumerate(per_rank):
        images = torch.cat([x[mask] for x, _, mask in batches])
        labels = torch.cat([y[mask] for _, y, mask in batches])
        mine = reference[rank::2]
        assert len(images) == len(mine)
        torch.testing.assert_close(images, torch.stack([x for x, _ in mine]))
        assert labels.tolist() == [y for _, y in mine]
        for x, _, mask in batches:
            assert x.shape == (16, 1, 16, 16) and (x[~mask] == 0).all()
    assert sum(int(mask.sum()) for b in per_rank for _, _, mask in b) == n
