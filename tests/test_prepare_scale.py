"""prepare at scale: list/synthetic sources, parallel byte-identical shards, byte limits, resize,
S3 output to a real S3-compatible server (moto) on loopback, `shards verify|info`, `bench data`."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import DataConfig
from pipeline.data.errors import DataError
from pipeline.data.eval_stream import iter_split
from pipeline.data.manifest import load_manifest, verify_manifest
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import StoredSample, plan_shards, tar_size
from pipeline.data.sources import load_source

ROOT = Path(__file__).resolve().parents[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def all_members(manifest_dir: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for shard in sorted((manifest_dir / "shards").glob("*.tar")):
        out.update(tar_members(shard))
    return out


def manifest_without_time(directory: Path) -> dict:
    info = json.loads((directory / "manifest.json").read_text())
    assert info.pop("created")
    return info


# --------------------------------------------------------------------------- list source


def write_images(root: Path) -> None:
    (root / "img" / "cats").mkdir(parents=True)
    (root / "img" / "dogs").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (20 + i, 16), (10 * i, 50, 90)).save(root / "img" / "cats" / f"c{i}.png")
        Image.new("RGB", (24, 18 + i), (200, 10 * i, 30)).save(root / "img" / "dogs" / f"d{i}.jpg", quality=90)


def test_list_source_csv_names_and_tsv_ints(tmp_path):
    write_images(tmp_path)
    lines = ["path,label"] + [f"img/cats/c{i}.png,cat" for i in range(4)] + [f"img/dogs/d{i}.jpg,dog" for i in range(4)]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    source = load_source(DataConfig(source="list", list_file=str(tmp_path / "list.csv")), lazy=True)
    assert source.class_names == ["cat", "dog"]
    assert Counter(s.label for s in source.samples) == {0: 4, 1: 4}
    assert all(s.path and s.data is None for s in source.samples)  # lazy: nothing read yet
    (tmp_path / "sub").mkdir()
    tsv = [f"../img/cats/c{i}.png\t{2}" for i in range(4)] + ["", "# a comment", "../img/dogs/d0.jpg\t0"]
    (tmp_path / "sub" / "list.tsv").write_text("\n".join(tsv) + "\n")  # no header; paths relative to sub/
    source = load_source(DataConfig(source="list", list_file=str(tmp_path / "sub" / "list.tsv")))
    assert source.class_names == ["0", "1", "2"] and [s.label for s in source.samples] == [2, 2, 2, 2, 0]
    assert source.samples[4].data == (tmp_path / "img" / "dogs" / "d0.jpg").read_bytes()  # eager: read now
    # prepared end to end: every key keeps its label
    cfg = DataConfig(source="list", list_file=str(tmp_path / "list.csv"), val_fraction=0.25, shard_max_samples=3, workers=1)
    m = load_manifest(prepare_dataset(cfg, tmp_path / "out"))
    verify_manifest(m)
    labels = {k: y for split in ("train", "val") for k, _, y in iter_split(m, split)}
    assert labels == {s.key: s.label for s in load_source(cfg).samples}


@pytest.mark.parametrize(
    "body, message",
    [
        ("path,label\nimg/cats/c0.png,cat\nimg/cats/c1.png\n", r"list\.csv:3: expected 2 fields"),
        ("img/cats/c0.png,cat\nimg/cats/nope.png,cat\n", r"list\.csv:2: image 'img/cats/nope\.png' not found"),
        ("img/cats/c0.png,cat\nnotes.txt,cat\n", r"list\.csv:2: 'notes\.txt' is not an image file"),
        ("img/cats/c0.png,cat\n\nimg/cats/c0.png,dog\n", r"list\.csv:3: 'img/cats/c0\.png' is already listed on line 1"),
        ("img/cats/c0.png,\n", r"list\.csv:1: empty label"),
        ("path,label\n", r"list\.csv: the list file has no entries"),
    ],
)
def test_list_source_errors_name_file_and_line(tmp_path, body, message):
    write_images(tmp_path)
    (tmp_path / "list.csv").write_text(body)
    with pytest.raises(DataError, match=message):
        load_source(DataConfig(source="list", list_file=str(tmp_path / "list.csv")), lazy=True)


def test_list_source_bad_image_is_named_with_its_line(tmp_path):
    write_images(tmp_path)
    (tmp_path / "img" / "cats" / "broken.png").write_bytes(b"\x89PNG not really" * 20)
    (tmp_path / "list.csv").write_text("img/cats/c0.png,cat\nimg/cats/broken.png,cat\n")
    with pytest.raises(DataError, match=r"list\.csv:2: .*broken\.png: not a readable image"):
        load_source(DataConfig(source="list", list_file=str(tmp_path / "list.csv")))
    # lazily, the prepare worker that reads it names the file
    cfg = DataConfig(source="list", list_file=str(tmp_path / "list.csv"), workers=1)
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        prepare_dataset(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


# --------------------------------------------------------------------------- synthetic source


def test_synthetic_source_is_deterministic():
    cfg = DataConfig(source="synthetic", synthetic_count=50, synthetic_size=[12, 20], synthetic_classes=4, seed=3)
    a, b = load_source(cfg), load_source(cfg)
    assert [s.label for s in a.samples] == [s.label for s in b.samples]
    assert set(s.label for s in a.samples) == {0, 1, 2, 3} and a.class_names == [f"class_{i}" for i in range(4)]
    pixels = a.samples[7].pixels()
    assert pixels.shape == (12, 20, 3) and (pixels == b.samples[7].pixels()).all()
    other = load_source(DataConfig(source="synthetic", synthetic_count=50, synthetic_size=[12, 20], seed=4))
    assert [s.label for s in other.samples] != [s.label for s in a.samples]
    assert not (other.samples[7].pixels() == pixels).all()


# --------------------------------------------------------------------------- parallel, byte limit, resize


def test_parallel_prepare_is_byte_identical_for_any_worker_count(tmp_path):
    base = dict(source="synthetic", synthetic_count=300, synthetic_size=[40, 56], image_format="jpg",
                resize_shorter_side=32, shard_max_samples=40, shard_max_bytes=60_000, seed=2)
    for workers in (1, 2):
        prepare_dataset(DataConfig(**base, workers=workers), tmp_path / f"w{workers}")
    one, two = tmp_path / "w1", tmp_path / "w2"
    names = sorted(p.name for p in (one / "shards").iterdir())
    assert names == sorted(p.name for p in (two / "shards").iterdir()) and len(names) > 300 // 40 + 2
    for name in names:
        assert (one / "shards" / name).read_bytes() == (two / "shards" / name).read_bytes(), name
    assert manifest_without_time(one) == manifest_without_time(two)
    m = load_manifest(one)
    verify_manifest(m)
    assert m.image_size == [32, 45]  # 40x56 (56 * 32 / 40 = 44.8) with the shorter side capped at 32


def test_shard_byte_limit_is_respected_and_shards_are_filled(tmp_path):
    limit = 50_000
    cfg = DataConfig(source="synthetic", synthetic_count=200, synthetic_size=[32, 32], image_format="png",
                     shard_max_samples=1000, shard_max_bytes=limit, workers=1)
    m = load_manifest(prepare_dataset(cfg, tmp_path))
    verify_manifest(m)
    shards = m.shards("train") + m.shards("val")
    assert len(shards) > 2 and all(s["bytes"] <= limit for s in shards)
    assert all(s["bytes"] == p.stat().st_size for s, p in zip(shards, m.shard_paths("train") + m.shard_paths("val")))
    # greedy: every shard but the last of a split is filled to within one sample (plus tar padding)
    train = m.shards("train")
    assert len(train) >= 2
    assert min(s["bytes"] for s in train[:-1]) > limit * 0.8


def test_plan_shards_counts_bytes_and_isolates_an_oversized_sample():
    def sample(n):
        return StoredSample("k", 0, "png", n, 1, 1, 1)

    small, huge = sample(1000), sample(30_000)
    plan = plan_shards([small] * 5 + [huge] + [small] * 3, max_samples=4, max_bytes=20_480)
    sizes = [len(r) for r in plan]
    assert sizes == [4, 1, 1, 3]  # count limit, then the huge one alone, then the rest
    assert tar_size(sum(s.tar_bytes for s in [small] * 4)) <= 20_480


def test_resize_shorter_side_and_original_bytes_kept(tmp_path):
    root = tmp_path / "images"
    (root / "big").mkdir(parents=True)
    (root / "small" / "deep" / "er").mkdir(parents=True)
    Image.new("RGB", (300, 200), (120, 30, 200)).save(root / "big" / "wide.jpg", quality=92)
    Image.new("RGB", (90, 250), (20, 130, 20)).save(root / "big" / "tall.png")
    Image.new("L", (50, 40), 77).save(root / "small" / "deep" / "er" / "tiny.png")  # nested: root/<class>/**/<img>
    Image.new("RGB", (64, 70), (1, 2, 3)).save(root / "small" / "edge.jpg", quality=90)  # shorter side == S
    cfg = DataConfig(source="folder", root=str(root), resize_shorter_side=64, val_fraction=0.5, workers=2)
    m = load_manifest(prepare_dataset(cfg, tmp_path / "out"))
    verify_manifest(m)
    members = all_members(tmp_path / "out")
    sizes = {name: Image.open(io.BytesIO(data)).size for name, data in members.items() if not name.endswith(".cls")}
    by_stem = {name.split(".")[0]: (name, size) for name, size in sizes.items()}
    assert by_stem["big_wide_jpg"] == ("big_wide_jpg.jpg", (96, 64))  # shorter side 200 -> 64, aspect kept
    assert by_stem["big_tall_png"] == ("big_tall_png.png", (64, 178))
    for stem, source in (("small_deep_er_tiny_png", "small/deep/er/tiny.png"), ("small_edge_jpg", "small/edge.jpg")):
        name, _ = by_stem[stem]
        assert sha(members[name]) == sha((root / source).read_bytes())  # no resize: the original bytes
    assert all(min(size) <= 64 for size in sizes.values())


# --------------------------------------------------------------------------- S3 output (moto server)


def download_dataset(client, bucket: str, prefix: str, dest: Path) -> None:
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]:
        path = dest / obj["Key"][len(prefix) + 1 :]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())


def test_prepare_to_s3_uploads_shards_then_manifest(s3_env, tmp_path):
    from pipeline.data import storage

    client, bucket = s3_env
    cfg = DataConfig(source="mnist5k", limit=200, shard_max_samples=40, workers=1)
    # an older, larger dataset at the same prefix: its manifest must go first, its extra shards after
    client.put_object(Bucket=bucket, Key="ds/manifest.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="ds/shards/train-000099.tar", Body=b"stale")
    puts: list[str] = []
    s3 = storage.s3_client()  # workers=1: every upload goes through this process's client
    s3.meta.events.register("before-parameter-build.s3.PutObject", lambda params, **_: puts.append(params["Key"]))
    s3.meta.events.register("before-parameter-build.s3.DeleteObject", lambda params, **_: puts.append("DELETE " + params["Key"]))
    url = prepare_dataset(cfg, f"s3://{bucket}/ds")
    assert url == f"s3://{bucket}/ds/manifest.json"
    assert puts[0] == "DELETE ds/manifest.json" and puts[-1] == "ds/manifest.json"
    shard_puts = [k for k in puts if k.startswith("ds/shards/")]
    assert len(shard_puts) == 6 and "DELETE ds/shards/train-000099.tar" in puts
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="ds/")["Contents"]}
    assert "ds/shards/train-000099.tar" not in keys
    # read back: the downloaded dataset verifies and matches a local prepare byte for byte
    download_dataset(client, bucket, "ds", tmp_path / "down")
    m = load_manifest(tmp_path / "down")
    verify_manifest(m)
    assert m.num_samples("train") + m.num_samples("val") == 200
    local = load_manifest(prepare_dataset(cfg, tmp_path / "local"))
    assert local.splits == m.splits


def test_prepare_to_s3_with_worker_processes(s3_env, tmp_path):
    client, bucket = s3_env
    cfg = DataConfig(source="digits", limit=300, shard_max_samples=50, workers=2)
    prepare_dataset(cfg, f"s3://{bucket}/par")  # the pool's processes upload as they finish
    download_dataset(client, bucket, "par", tmp_path / "down")
    m = load_manifest(tmp_path / "down")
    verify_manifest(m)
    assert len(m.shards("train")) == 6 and m.num_samples("train") + m.num_samples("val") == 300


# --------------------------------------------------------------------------- shards verify / info


@pytest.fixture(scope="module")
def small_dataset(digits300) -> Path:
    return digits300


@pytest.fixture
def dataset(small_dataset, tmp_path) -> Path:
    return Path(shutil.copytree(small_dataset, tmp_path / "ds"))


def edit_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def shard_record(info: dict, name: str) -> dict:
    return next(s for split in info["splits"].values() for s in split["shards"] if s["name"] == name)


def rewrite_shard(directory: Path, name: str, change_members) -> None:
    """Rewrite a shard with edited members and record its new size and sha, so only the edit is wrong."""
    path = directory / name
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isreg()]
    members = change_members(members)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    edit_manifest(directory, lambda i: shard_record(i, name).update(bytes=len(data), sha256=sha(data)))


def verify(directory: Path, capsys) -> tuple[int, str]:
    code = main(["shards", "verify", str(directory / "manifest.json")])
    return code, capsys.readouterr().out


def test_verify_passes_on_a_good_dataset(small_dataset, capsys):
    code, out = verify(small_dataset, capsys)
    assert code == 0 and "OK: every shard matches" in out and "300 samples" in out


def test_verify_finds_a_bad_hash(dataset, capsys):
    edit_manifest(dataset, lambda i: shard_record(i, "shards/train-000002.tar").update(sha256="0" * 64))
    code, out = verify(dataset, capsys)
    assert code == 1 and "FAIL shards/train-000002.tar: sha256 is" in out
    assert "1 problem(s) in 1 shard(s): shards/train-000002.tar" in out


def test_verify_finds_a_truncated_shard(dataset, capsys):
    shard = dataset / "shards" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:7000])
    code, out = verify(dataset, capsys)
    assert code == 1 and "shards/train-000001.tar: size is 7000 bytes" in out
    assert "shards/train-000001.tar: holds" in out  # and the count it could read


def test_verify_finds_a_corrupt_image_member(dataset, capsys):
    def corrupt(members):
        info, data = members[5]  # some sample's .png
        assert info.name.endswith(".png")
        members[5] = (info, data[:40] + b"\x00" * (len(data) - 40))  # same size, broken pixel data
        return members

    rewrite_shard(dataset, "shards/val-000000.tar", corrupt)
    code, out = verify(dataset, capsys)
    key = tar_members(dataset / "shards" / "val-000000.tar")
    bad = [n for n in key if n.endswith(".png")][2].split(".")[0]
    assert code == 1 and f"FAIL shards/val-000000.tar: sample '{bad}': .png does not decode" in out


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 million for 20000) in about 50 KB: the
    decompression bomb PIL refuses from its header (over twice Image.MAX_IMAGE_PIXELS)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    pixels = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_verify_reports_a_decompression_bomb_as_a_problem(dataset, capsys):
    bomb = png_bomb()
    assert len(bomb) < 200_000
    swapped = {}

    def plant(members):
        index = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".png"))
        swapped["key"] = members[index][0].name.split(".")[0]
        members[index] = (members[index][0], bomb)
        return members

    rewrite_shard(dataset, "shards/train-000001.tar", plant)
    code, out = verify(dataset, capsys)
    assert code == 1 and f"FAIL shards/train-000001.tar: sample '{swapped['key']}': .png is a decompression bomb" in out
    assert "400000000 pixels" in out and "1 problem(s) in 1 shard(s)" in out


def test_prepare_of_a_folder_holding_a_bomb_names_the_file(tmp_path, capsys):
    root = tmp_path / "imgs"
    for label, s in enumerate(load_source(DataConfig(source="digits", limit=6)).samples[:6]):
        (root / f"c{label % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.array).save(root / f"c{label % 2}" / f"{s.key}.png")
    (root / "c1" / "huge.png").write_bytes(png_bomb())
    code = main(["prepare", str(ROOT / "configs" / "pipeline" / "tiny.yaml"), "data.source=folder", f"data.root={root}",
                 "data.workers=1", "tracking.enabled=false", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and f"{root / 'c1' / 'huge.png'}: refused as a decompression bomb" in err, err
    assert "Traceback" not in err and not (tmp_path / "out" / "manifest.json").exists()


def test_verify_finds_a_missing_cls_member(dataset, capsys):
    dropped = {}

    def drop_cls(members):
        index = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".cls"))
        dropped["key"] = members[index][0].name.split(".")[0]
        return members[:index] + members[index + 1 :]

    rewrite_shard(dataset, "shards/train-000003.tar", drop_cls)
    code, out = verify(dataset, capsys)
    assert code == 1 and f"FAIL shards/train-000003.tar: sample '{dropped['key']}': no .cls label" in out
    assert out.count("FAIL") == 1  # size, sha and count still agree: only the missing label is reported


def test_verify_finds_a_wrong_count(dataset, capsys):
    def wrong(info):
        shard_record(info, "shards/train-000000.tar")["samples"] += 1
        info["splits"]["train"]["samples"] += 1

    edit_manifest(dataset, wrong)
    code, out = verify(dataset, capsys)
    assert code == 1 and "shards/train-000000.tar: holds 50 samples but the manifest records 51" in out


def test_shards_info_summary(small_dataset, capsys):
    assert main(["shards", "info", str(small_dataset)]) == 0
    out = capsys.readouterr().out
    info = json.loads((small_dataset / "manifest.json").read_text())
    train = info["splits"]["train"]
    assert f"train: {train['samples']} samples in {len(train['shards'])} shards" in out
    assert "total: 300 samples" in out and "classes: 10" in out
    assert "image sizes (WxH): 1 distinct; most common 8x8 (300)" in out
    per_class = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit() and parts[1].endswith(":"):
            per_class[parts[1][:-1]] = int(parts[2])
    assert set(per_class) == {str(d) for d in range(10)} and sum(per_class.values()) == 300
    assert min(per_class.values()) >= 29  # limit is class-stratified: ~30 per digit


# --------------------------------------------------------------------------- bench data


def test_bench_data_end_to_end(small_dataset, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "data", str(small_dataset), "--max-images", "64", "--batch", "16", "--workers", "1",
                 "--repeats", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "x ceiling" in text and "x per-image" in text and "raw read, local tar shards" in text
    result = json.loads(out.read_text())
    assert result["results"]["images_measured"] == 64
    assert result["results"]["loader"][0]["workers"] == 1 and result["results"]["loader"][0]["images"] == 64
    for key in ("loader_w1_per_worker_vs_ceiling", "http_shards_vs_per_image", "raw_shards_vs_raw_folder"):
        assert result["ratios"][key] > 0
    assert result["machine"]["cores"] >= 1


def test_bench_prepare_end_to_end(tmp_path, capsys):
    """`vitpipe bench prepare` prepares the same images with each worker count, checks the shards are
    byte-identical, and reports rates, speed-ups and the pool's start-up."""
    out = tmp_path / "bench_prepare.json"
    code = main(["bench", "prepare", "--count", "120", "--size", "24,32", "--format", "png", "--workers", "1,2",
                 "--shard-max-samples", "20", "--repeats", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "byte-identical for every worker count: yes" in text
    result = json.loads(out.read_text())
    one, two = result["runs"]
    assert (one["workers"], two["workers"]) == (1, 2) and one["speedup_vs_min_workers"] == 1.0
    assert one["pool_startup_s"] == 0 and two["pool_startup_s"] > 0
    assert all(r["images_per_s"] > 0 and r["speedup_vs_min_workers"] > 0 for r in (one, two))
    assert main(["bench", "prepare", "--size", "24", "--out", str(out)]) != 0
    assert "--size '24': expected height,width" in capsys.readouterr().err


def test_malloc_tuning_reaches_child_processes():
    """The glibc settings that keep freed image buffers (pipeline/memory.py) apply to this process and
    reach processes started from it through the environment, without overriding a user's value."""
    import os
    import subprocess
    import sys

    from pipeline.memory import tune_malloc

    env_before = {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}
    try:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "1048576"  # a user's own choice
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        assert tune_malloc() is True  # glibc on this machine
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['MALLOC_TRIM_THRESHOLD_'], "
                                "os.environ['MALLOC_MMAP_THRESHOLD_'])"], capture_output=True, text=True, check=True)
        assert child.stdout.split() == [str(128 << 20), "1048576"]
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_photo_crops_are_real_photo_jpegs_at_imagenet_size(tmp_path):
    """The benchmark's photo set: seeded crops of scikit-learn's two photos, 240-427 x 200-360 px,
    a class-folder tree that prepare reads; the same seed writes the same files."""
    from PIL import Image

    from tools.photo_crops import write_photo_crops

    a, b = write_photo_crops(tmp_path / "a", 8), write_photo_crops(tmp_path / "b", 8)
    files = sorted(a.rglob("*.jpg"))
    assert [f.relative_to(a).parts[0] for f in files].count("photo0") == 4 and len(files) == 8
    for f in files:
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
        with Image.open(f) as im:
            assert im.format == "JPEG" and 240 <= im.width <= 427 and 200 <= im.height <= 360
    manifest = load_manifest(prepare_dataset(DataConfig(source="folder", root=str(a), val_fraction=0.25,
                                                        shard_max_samples=4, workers=1), tmp_path / "ds"))
    assert manifest.class_names == ["photo0", "photo1"] and manifest.num_samples("train") == 6
