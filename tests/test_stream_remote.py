"""The training stream reads shards over HTTP, from S3 and through pipe: commands — real servers on
loopback — and gets exactly the batches it gets from local files."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from pipeline.config import DataConfig
from pipeline.data.errors import DataError
from pipeline.data.manifest import load_manifest
from pipeline.data.prepare import prepare_dataset
from pipeline.data.stream import train_stream
from pipeline.data.transforms import TrainTransform

TRANSFORM = TrainTransform(image_size=8, in_channels=1, mean=[0.5], std=[0.5])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote")
    return prepare_dataset(DataConfig(source="digits", limit=300, shard_max_samples=60), out)


@pytest.fixture(scope="module")
def http_root(dataset):
    """A real HTTP server on 127.0.0.1 serving the dataset folder."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(dataset.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def epoch_keys(manifest, workers=0, world=2, **kw):
    stream = train_stream(manifest, transform=TRANSFORM, micro_batch=16, rank=0, world_size=world, workers=workers,
                          shuffle_buffer=40, seed=3, **kw)
    return [b["keys"] for _, b in zip(range(stream.steps_per_epoch), stream)]


@pytest.mark.parametrize("workers", [0, 2])
def test_http_stream_equals_local(dataset, http_root, workers):
    assert epoch_keys(dataset, workers, base_url=http_root) == epoch_keys(dataset, workers)


def test_http_shard_with_wrong_content_is_named(dataset, http_root, tmp_path):
    # A server that serves other bytes than the manifest recorded: caught by size/sha256.
    import json
    import shutil

    copy = Path(shutil.copytree(dataset.parent, tmp_path / "copy")) / "manifest.json"
    info = json.loads(copy.read_text())
    info["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    copy.write_text(json.dumps(info))
    name = info["splits"]["train"]["shards"][0]["name"]
    with pytest.raises(DataError, match=f"{name}: sha256"):
        epoch_keys(copy, world=1, base_url=http_root)  # one rank reads every shard


def test_missing_http_shard_is_named(dataset, http_root):
    with pytest.raises(DataError, match="404"):
        epoch_keys(dataset, base_url=http_root + "/nowhere")


def test_s3_stream_equals_local(dataset, s3_env):
    client, bucket = s3_env
    m = load_manifest(dataset)
    for path, rec in zip(m.shard_paths("train"), m.shards("train")):
        client.upload_file(str(path), bucket, f"data/{rec['name']}")
    assert epoch_keys(dataset, base_url=f"s3://{bucket}/data") == epoch_keys(dataset)


def test_pipe_stream_equals_local(dataset):
    # pipe: runs a command per shard and reads its stdout (e.g. `aws s3 cp URL -` or `curl -s URL`)
    base = f"pipe:cat {dataset.parent}"
    assert epoch_keys(dataset, base_url=base) == epoch_keys(dataset)
