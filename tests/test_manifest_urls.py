"""Datasets whose manifest lives at a URL: `load_manifest`, `vitpipe shards verify|info`, the pre-flight
check, the training stream and evaluation batches, against real servers on loopback (moto's S3
server from conftest.py and a `http.server` serving a prepared dataset folder)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

from pipeline.data.errors import DataError
from pipeline.data.eval_stream import eval_batches
from pipeline.data.manifest import load_manifest, manifest_location, verify_manifest
from pipeline.data.stream import train_stream
from pipeline.data.transforms import TrainTransform
from stages.record import file_identity

ROOT = Path(__file__).resolve().parents[1]
TRANSFORM = TrainTransform(image_size=8, in_channels=1, mean=[0.5], std=[0.5])
EVAL = dict(image_size=8, in_channels=1, mean=[0.5], std=[0.5], batch_size=16, rank=0, world_size=1)


@pytest.fixture(scope="module")
def dataset(digits300) -> Path:
    """A small prepared dataset (300 8x8 digits, 50 per shard; conftest.py): the folder holding manifest.json."""
    return digits300


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `folder`; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_dataset(dataset, tmp_path) -> Iterator[tuple[str, Path]]:
    """(URL of the dataset folder, the served copy of it): a copy, so a test may damage it."""
    copy = Path(shutil.copytree(dataset, tmp_path / "served" / "ds"))
    with serve(copy.parent) as base:
        yield f"{base}/ds", copy


@pytest.fixture
def s3_dataset(dataset, s3_env) -> tuple[str, object, str]:
    """(s3:// URL of the dataset prefix, boto3 client, bucket): the dataset uploaded to a fresh bucket."""
    client, bucket = s3_env
    for path in sorted(p for p in dataset.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"ds/{path.relative_to(dataset).as_posix()}")
    return f"s3://{bucket}/ds", client, bucket


def vitpipe(*args: str) -> subprocess.CompletedProcess:
    """The `vitpipe` command in a fresh process (inherits the AWS_* variables the fixtures set)."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def two_shards(dataset: Path) -> tuple[str, str]:
    """Names of two shards: one to delete and one to rewrite."""
    m = load_manifest(dataset)
    return m.shards("train")[1]["name"], m.shards("val")[0]["name"]


# --------------------------------------------------------------------------- load_manifest


def test_load_manifest_from_s3(dataset, s3_dataset):
    url, _, bucket = s3_dataset
    local = load_manifest(dataset)
    for form in (url, url + "/", url + "/manifest.json"):
        m = load_manifest(form)
        assert m.path == f"{url}/manifest.json" and m.is_remote
        assert m.splits == local.splits and m.class_names == local.class_names
        first = m.shards("train")[0]["name"]
        assert m.shard_location(first) == f"{url}/{first}"
        assert m.shard_locations("val") == [f"{url}/{s['name']}" for s in local.shards("val")]
    with pytest.raises(DataError, match="at a URL"):
        m.shard_paths("train")  # no local paths for a URL manifest
    with pytest.raises(DataError, match=f"s3://{bucket}/nowhere/manifest.json: cannot fetch the manifest"):
        load_manifest(f"s3://{bucket}/nowhere")
    with pytest.raises(DataError, match="looks like a URL"):
        load_manifest(Path(url))  # Path() collapsed the '//'


def test_load_manifest_from_http_and_its_errors(dataset, http_dataset):
    url, folder = http_dataset
    m = load_manifest(url)
    assert m.path == f"{url}/manifest.json" and m.splits == load_manifest(dataset).splits
    assert load_manifest(f"{url}/manifest.json").shard_locations("train") == m.shard_locations("train")
    with pytest.raises(DataError, match=rf"{url}/missing/manifest.json: cannot fetch the manifest \(.*404"):
        load_manifest(f"{url}/missing")
    (folder / "junk.json").write_text("<html>not json</html>")
    with pytest.raises(DataError, match=rf"{url}/junk.json: not valid JSON"):
        load_manifest(f"{url}/junk.json")
    info = json.loads((folder / "manifest.json").read_text())
    info["format"] = "something/else"
    (folder / "old.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=rf"{url}/old.json: format is 'something/else'"):
        load_manifest(f"{url}/old.json")


def test_stage_inputs_name_a_url_manifest_by_its_bytes(http_dataset):
    url, folder = http_dataset
    assert manifest_location(url) == manifest_location(url + "/manifest.json") == f"{url}/manifest.json"
    assert manifest_location(folder) == str((folder / "manifest.json").resolve())
    ident = file_identity(manifest_location(url))  # what a stage's fingerprint records
    assert ident["sha256"] == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()


# --------------------------------------------------------------------------- vitpipe shards info / verify


def expected_counts(dataset: Path) -> list[str]:
    m = load_manifest(dataset)
    total = m.num_samples("train") + m.num_samples("val")
    return [f"train: {m.num_samples('train')} samples in {len(m.shards('train'))} shards",
            f"val: {m.num_samples('val')} samples in {len(m.shards('val'))} shards",
            f"total: {total} samples", "classes: 10"]


@pytest.mark.parametrize("where", ["s3", "http"])
def test_shards_info_and_verify_on_a_url_manifest(where, dataset, request):
    url = request.getfixturevalue(f"{where}_dataset")[0]
    info = vitpipe("shards", "info", url)
    assert info.returncode == 0, info.stderr
    assert f"manifest {url}/manifest.json" in info.stdout
    for line in expected_counts(dataset):
        assert line in info.stdout
    verify = vitpipe("shards", "verify", url)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "OK: every shard matches its size and sha256; 300 samples" in verify.stdout
    assert "FAIL" not in verify.stdout


def assert_two_bad_shards(proc: subprocess.CompletedProcess, missing: str, rewritten: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert f"FAIL {missing}: shard is missing" in out
    assert f"FAIL {rewritten}: size is" in out and f"FAIL {rewritten}: sha256 is" in out
    assert f"in 2 shard(s): {', '.join(sorted([missing, rewritten]))}" in out


def test_verify_s3_reports_a_deleted_and_a_rewritten_shard(dataset, s3_dataset):
    url, client, bucket = s3_dataset
    missing, rewritten = two_shards(dataset)
    client.delete_object(Bucket=bucket, Key=f"ds/{missing}")
    data = (dataset / rewritten).read_bytes()
    client.put_object(Bucket=bucket, Key=f"ds/{rewritten}", Body=data[: len(data) // 2])  # a cut-off upload
    assert_two_bad_shards(vitpipe("shards", "verify", url), missing, rewritten)


def test_verify_http_reports_a_deleted_and_a_rewritten_shard(dataset, http_dataset):
    url, folder = http_dataset
    missing, rewritten = two_shards(dataset)
    (folder / missing).unlink()
    data = (folder / rewritten).read_bytes()
    (folder / rewritten).write_bytes(data[: len(data) // 2])
    assert_two_bad_shards(vitpipe("shards", "verify", url + "/manifest.json"), missing, rewritten)


# --------------------------------------------------------------------------- pre-flight check (pretrain, finetune)


def test_verify_manifest_checks_url_shards_exist_with_their_size(dataset, s3_dataset):
    url, client, bucket = s3_dataset
    verify_manifest(load_manifest(url))  # every shard there, at its recorded size
    missing, rewritten = two_shards(dataset)
    client.put_object(Bucket=bucket, Key=f"ds/{rewritten}", Body=b"short")
    with pytest.raises(DataError, match=rf"{url}/{rewritten}: size is 5 bytes"):
        verify_manifest(load_manifest(url))
    client.delete_object(Bucket=bucket, Key=f"ds/{missing}")
    with pytest.raises(DataError, match=rf"{url}/{missing}: shard listed in {url}/manifest.json is missing"):
        verify_manifest(load_manifest(url))


# --------------------------------------------------------------------------- training stream, evaluation


def test_train_stream_over_s3_manifest_reads_every_sample_once(dataset, s3_dataset):
    url = s3_dataset[0]
    m = load_manifest(url)
    n = m.num_samples("train")
    batch = next(b for b in range(16, 0, -1) if n % b == 0)  # one stream, nothing dropped

    def epoch(manifest) -> list[str]:
        stream = train_stream(manifest, transform=TRANSFORM, micro_batch=batch, rank=0, world_size=1,
                              shuffle_buffer=40, seed=5)
        assert stream.dropped_per_epoch == 0
        return [k for _, b in zip(range(stream.steps_per_epoch), stream) for k in b["keys"]]

    keys = epoch(m)
    assert len(keys) == len(set(keys)) == n
    expected = {f"{rec['name']}/{key}" for rec, key in shard_keys(dataset, "train")}
    assert set(keys) == expected
    assert keys == epoch(load_manifest(dataset))  # the same plan and order as from local files


def shard_keys(dataset: Path, split: str) -> list[tuple[dict, str]]:
    """(shard record, sample key) of every sample of `split`, read from the local tar files."""
    import tarfile

    m = load_manifest(dataset)
    out = []
    for rec, path in zip(m.shards(split), m.shard_paths(split)):
        with tarfile.open(path) as tar:
            out += [(rec, name) for name in dict.fromkeys(t.name.rsplit(".", 1)[0] for t in tar if t.isreg())]
    return out


def test_eval_batches_over_http_manifest(dataset, http_dataset):
    url = http_dataset[0]
    m = load_manifest(url)
    remote = list(eval_batches(m, "val", **EVAL))
    local = list(eval_batches(load_manifest(dataset), "val", **EVAL))
    assert sum(int(mask.sum()) for _, _, mask in remote) == m.num_samples("val")
    assert len(remote) == len(local)
    for (xr, yr, mr), (xl, yl, ml) in zip(remote, local):
        assert torch.equal(xr, xl) and torch.equal(yr, yl) and torch.equal(mr, ml)


def test_preflight_checks_train_shards_where_training_reads_them(dataset, http_dataset, tmp_path):
    """pretrain.shard_base_url moves where train shards are read: the pre-flight checks them there
    (and no longer beside the manifest), and names a missing one by its URL."""
    url, served = http_dataset
    local = tmp_path / "manifest-only"
    local.mkdir()
    shutil.copy(dataset / "manifest.json", local / "manifest.json")
    shutil.copytree(dataset / "shards", local / "shards", ignore=shutil.ignore_patterns("train-*"))
    m = load_manifest(local)
    with pytest.raises(DataError, match="train-000000.tar"):
        verify_manifest(m)  # beside the manifest: no train shards
    verify_manifest(m, train_base_url=url)  # served over HTTP: all there, right sizes
    verify_manifest(m, train_base_url=str(dataset))  # a local folder works the same way
    (served / "shards" / "train-000002.tar").unlink()
    with pytest.raises(DataError, match=r"http://.*/shards/train-000002\.tar: shard .* is missing"):
        verify_manifest(m, train_base_url=url)


def test_a_recipe_that_prepares_to_s3_trains_from_there(tmp_path):
    """With data.output=s3://..., `vitpipe run`, the stage commands and multi-node jobs all read the
    manifest from there; a local data.output works the same way."""
    from pipeline.config import load_config
    from stages.recipe import dataset_manifest
    from stages.submit import submitted_job

    recipe = str(ROOT / "configs" / "pipeline" / "tiny.yaml")
    cfg = load_config(recipe, ["data.output=s3://bucket/datasets/mnist/"])
    assert dataset_manifest(cfg, tmp_path) == "s3://bucket/datasets/mnist/manifest.json"
    job = submitted_job(load_config(recipe, ["data.output=s3://bucket/datasets/mnist"]), tmp_path)
    assert job.manifest == "s3://bucket/datasets/mnist/manifest.json"
    cfg = load_config(recipe, [f"data.output={tmp_path / 'ds'}"])
    assert dataset_manifest(cfg, tmp_path) == tmp_path / "ds" / "manifest.json"
    assert dataset_manifest(load_config(recipe, []), tmp_path) == tmp_path / "prepare" / "manifest.json"
    with pytest.raises(FileNotFoundError, match="no manifest"):
        submitted_job(load_config(recipe, []), tmp_path)
