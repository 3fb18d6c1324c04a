"""Issue 11's data faults, each against real parts: pipe: URLs end to end, a loopback HTTP server that
drops connections and answers 503 (and a proxy that drops S3 reads from a real moto server), a
tampered shard under `verify_shards: size`, a full disk during prepare (the one fake: a writer that
raises ENOSPC), and hostile tar members read by every reader alike."""

from __future__ import annotations

import errno
import hashlib
import http.server
import io
import json
import os
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import webdataset.tariterators as wds_tar

from pipeline import atomic
from pipeline.cli import main
from pipeline.config import DataConfig
from pipeline.data import shards, storage
from pipeline.data.errors import DataError
from pipeline.data.eval_stream import iter_split
from pipeline.data.manifest import load_manifest, manifest_location, verify_manifest
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shard_format import read_shard, split_member_name
from pipeline.data.stream import plan_epoch, train_stream
from pipeline.data.transforms import TrainTransform
from test_prepare_scale import png_bomb

ROOT = Path(__file__).resolve().parents[1]
TRANSFORM = TrainTransform(image_size=8, in_channels=1, mean=[0.5], std=[0.5])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults")
    return prepare_dataset(DataConfig(source="digits", limit=300, shard_max_samples=60, workers=1), out)


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    shutil.copytree(dataset.parent, tmp_path / "d")
    return tmp_path / "d" / "manifest.json"


def epoch_keys(manifest, world=1, **kw):
    stream = train_stream(manifest, transform=TRANSFORM, micro_batch=16, rank=0, world_size=world,
                          shuffle_buffer=40, seed=3, **kw)
    return [b["keys"] for _, b in zip(range(stream.steps_per_epoch), stream)]


# --------------------------------------------------------------------------- pipe:


def test_pipe_manifest_and_shards_end_to_end(dataset, capsys):
    """A manifest read through `pipe:cat`, its shards too: pre-flight, loading, streaming, evaluation, verify."""
    url = f"pipe:cat {dataset}"
    m = load_manifest(url)
    assert m.is_remote and m.shard_location(m.shards("train")[0]["name"]).startswith(f"pipe:cat {dataset.parent}/")
    assert manifest_location(url) == url
    verify_manifest(m)  # the pre-flight check no longer takes pipe: for a missing local path
    verify_manifest(load_manifest(dataset), train_base_url=f"pipe:cat {dataset.parent}")
    assert epoch_keys(m) == epoch_keys(dataset)
    assert [k for k, _, _ in iter_split(m, "val")] == [k for k, _, _ in iter_split(dataset, "val")]
    assert main(["shards", "verify", url]) == 0
    assert "OK: every shard matches" in capsys.readouterr().out


def test_pipe_command_that_fails_is_named(dataset):
    m = load_manifest(dataset)
    with pytest.raises(DataError, match=r"pipe:cat /nowhere/.*: command exited with status 1"):
        epoch_keys(m, base_url="pipe:cat /nowhere")


# --------------------------------------------------------------------------- flaky HTTP


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Serves a folder with Range support; per path, the first GET answers 503 and the second sends
    half its body and drops the connection. Records every request's Range header."""

    protocol_version = "HTTP/1.1"
    root: Path
    hits: dict
    ranges: list
    always_503 = False

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.root / self.path.lstrip("/")
        n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        self.ranges.append((self.path, self.headers.get("Range")))
        if self.always_503 or n == 1:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if n == 2 and len(body) > 1:  # cut the body off in the middle
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def flaky(dataset, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BACKOFF_S", 0.01)
    handler = type("Handler", (_Flaky,), {"root": dataset.parent, "hits": {}, "ranges": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_http_503_and_dropped_connections_are_retried_and_resumed(dataset, flaky):
    url, handler = flaky
    m = load_manifest(url)  # the manifest itself: a 503, then a body cut in half
    assert m.splits == load_manifest(dataset).splits
    assert epoch_keys(m) == epoch_keys(dataset)  # every shard: 503, dropped mid-body, resumed
    resumed = [(p, r) for p, r in handler.ranges if r and r != "bytes=0-"]
    shard_paths = {p for p, _ in handler.ranges if p.endswith(".tar")}
    assert shard_paths and {p for p, _ in resumed} >= shard_paths  # each shard resumed where it broke off
    for path, rng in resumed:
        size = (dataset.parent / path.lstrip("/")).stat().st_size
        assert rng == f"bytes={size // 2}-"  # at the byte offset reached, not from the start


def test_http_permanent_errors_name_the_url(dataset, flaky, monkeypatch):
    url, handler = flaky
    with pytest.raises(DataError, match=rf"{url}/missing/manifest.json: cannot fetch the manifest \(.*404"):
        load_manifest(f"{url}/missing")
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 3)
    handler.always_503 = True
    with pytest.raises(DataError, match=rf"{url}/manifest.json: .*gave up after 3 attempts.*503"):
        load_manifest(url)


# --------------------------------------------------------------------------- tampered shard


def _flip_label(path: Path) -> str:
    """Change the first .cls digit in place (same size, new sha256); the key whose label changed."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith(".cls"))
    data = bytearray(path.read_bytes())
    old = data[member.offset_data]
    data[member.offset_data] = ord("0") if old != ord("0") else ord("1")
    path.write_bytes(bytes(data))
    return member.name.split(".")[0]


def test_a_tampered_shard_delivers_no_sample(copy):
    m = load_manifest(copy)
    counts = [r["samples"] for r in m.shards("train")]
    plan = plan_epoch(counts, seed=3, epoch=0, world_size=1, workers=1, micro_batch=16)
    first = plan.streams[0][0]  # the shard the stream reads first
    name = m.shards("train")[first]["name"]
    _flip_label(copy.parent / name)
    verify_manifest(m, check_hashes=False)  # verify_shards: size lets it through (same size, labels in range)
    stream = train_stream(copy, transform=TRANSFORM, micro_batch=16, rank=0, world_size=1, shuffle_buffer=1, seed=3)
    delivered = []
    with pytest.raises(DataError, match=rf"{name}: sha256 is .* \(the shard changed after prepare\)"):
        for batch in stream:
            delivered += batch["keys"]
    assert not [k for k in delivered if k.startswith(f"{name}/")]
    assert delivered == []  # it was the first shard: nothing at all came out before the check


def test_a_tampered_shard_behind_a_url_manifest_delivers_no_sample(copy, flaky):
    url, handler = flaky  # serves the dataset fixture's folder; tamper a copy of it instead
    handler.root = copy.parent
    m = load_manifest(url)
    name = m.shards("train")[0]["name"]
    _flip_label(copy.parent / name)
    verify_manifest(m)  # HEAD: right size
    delivered = []
    with pytest.raises(DataError, match=rf"{name}: sha256 is"):
        for batch in train_stream(m, transform=TRANSFORM, micro_batch=16, rank=0, world_size=1,
                                  shuffle_buffer=1, seed=3):
            delivered += batch["keys"]
    assert not [k for k in delivered if k.startswith(f"{name}/")]


# --------------------------------------------------------------------------- full disk


def test_full_disk_during_prepare_names_the_path_and_keeps_the_previous_dataset(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["prepare", str(ROOT / "configs" / "pipeline" / "tiny.yaml"), "data.source=digits", "data.limit=200",
            "data.workers=1", "tracking.enabled=false", "--out", str(out)]
    assert main(args) == 0
    before = (out / "manifest.json").read_bytes()
    shard_files = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    capsys.readouterr()

    written = {"n": 0}
    real_write = shards._HashingWriter.write

    def full_disk(self, data):
        written["n"] += len(data)
        if written["n"] > 20_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(shards._HashingWriter, "write", full_disk)
    assert main(args + ["--force", "data.seed=5"]) == 1
    err = capsys.readouterr().err
    # the file being written (in the new shards folder, staged beside the old one) and why, in one line
    assert f"error: {out}/" in err and "train-000000.tar: cannot write (no space left on device)" in err, err
    errors = [line for line in err.splitlines() if not line.startswith("[prepare]")]  # progress lines aside
    assert "Traceback" not in err and len(errors) == 1, err  # one line, no chained tracebacks
    assert (out / "manifest.json").read_bytes() == before
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == shard_files
    assert not [p for p in out.iterdir() if atomic.is_temporary(p)]  # no temporaries left behind
    verify_manifest(load_manifest(out))


# --------------------------------------------------------------------------- hostile members


def test_the_key_rule_is_webdatasets():
    for name in ["a.png", "a.b.png", "dir/x.seg.PNG", "x", "dir.d/y.cls", ".hidden.png", "a..png", "d/e/f.tar.gz"]:
        key, suffix = wds_tar.base_plus_ext(name)
        assert split_member_name(name) == (key, suffix.lower() if suffix else suffix), name


def _tar(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_hostile_members_are_refused_by_name_in_every_reader(dataset, tmp_path, capsys):
    with tarfile.open(dataset.parent / "shards" / "val-000000.tar") as tar:
        image = tar.extractfile(next(m for m in tar if m.name.endswith(".png"))).read()
    hostile = [("good.png", image), ("good.cls", b"1"),
               _link("sym.png", tarfile.SYMTYPE, "/etc/passwd"), ("sym.cls", b"1"),
               _link("hard.png", tarfile.LNKTYPE, "good.png"), ("hard.cls", b"2"),
               ("../up.png", image), ("../up.cls", b"1"),
               ("/abs.png", image), ("/abs.cls", b"1"),
               ("empty.png", b""), ("empty.cls", b"1"),
               ("dup.png", image), ("dup.cls", b"1"), ("other.png", image), ("other.cls", b"3"),
               ("dup.png", image), ("dup.cls", b"1"),
               ("two.png", image), ("two.png", image), ("two.cls", b"1")]
    data = _tar(hostile)
    record = {"name": "t.tar", "samples": 7, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    problems: list[str] = []
    good = [s.key for s in read_shard(io.BytesIO(data), record, "t.tar", 10, problems=problems)]
    text = "\n".join(problems)
    # a stream sees a duplicate key only when it comes back: the first copy is a sample, the second refused
    assert good == ["good", "dup", "other"]
    for expected in ["'sym.png' is a symbolic link", "'hard.png' is a hard link", "'../up.png' has an absolute or '..'",
                     "'../up.cls' has an absolute", "'/abs.png' has an absolute", "'empty.png' is empty",
                     "sample 'dup': members are not contiguous (duplicate key)", "sample 'two': two .png members"]:
        assert expected in text, (expected, text)

    # raise mode (training, evaluation, pre-flight): the first problem, named, and nothing delivered
    with pytest.raises(DataError, match=r"t.tar: member 'sym.png' is a symbolic link; refused"):
        list(read_shard(io.BytesIO(data), record, "t.tar", 10))

    # the same shard behind a manifest: `vitpipe shards verify` reports every one, by name
    folder = tmp_path / "ds"
    shutil.copytree(dataset.parent, folder)
    (folder / "shards" / "val-000000.tar").write_bytes(data)
    info = json.loads((folder / "manifest.json").read_text())
    shard = info["splits"]["val"]["shards"][0]
    info["splits"]["val"]["samples"] += 7 - shard["samples"]
    shard.update(samples=7, bytes=len(data), sha256=record["sha256"])
    (folder / "manifest.json").write_text(json.dumps(info))
    assert main(["shards", "verify", str(folder)]) == 1
    out = capsys.readouterr().out
    for expected in ["FAIL shards/val-000000.tar: member 'sym.png' is a symbolic link",
                     "FAIL shards/val-000000.tar: member '/abs.png' has an absolute or '..' path",
                     "FAIL shards/val-000000.tar: sample 'empty': member 'empty.png' is empty"]:
        assert expected in out, out
    with pytest.raises(DataError, match=r"val-000000.tar: member 'sym.png' is a symbolic link"):
        list(iter_split(load_manifest(folder), "val"))
    with pytest.raises(DataError, match=r"val-000000.tar: member 'sym.png' is a symbolic link"):
        verify_manifest(load_manifest(folder))


def test_a_decompression_bomb_in_the_stream_is_skipped_and_counted(copy):
    m = load_manifest(copy)
    name = m.shards("train")[0]["name"]
    path = copy.parent / name
    with tarfile.open(path) as tar:
        members = [(i, tar.extractfile(i).read()) for i in tar]
    bombed = members[0][0].name.split(".")[0]
    members = [(i, png_bomb() if i.name == f"{bombed}.png" else d) for i, d in members]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = path.read_bytes()
    info = json.loads(copy.read_text())
    info["splits"]["train"]["shards"][0].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    copy.write_text(json.dumps(info))
    stream = train_stream(copy, transform=TRANSFORM, micro_batch=16, rank=0, world_size=1, shuffle_buffer=40,
                          seed=3, max_corrupt_fraction=0.05)
    batches = [b for _, b in zip(range(stream.steps_per_epoch), stream)]
    assert sum(b["corrupt"].get(name, 0) for b in batches) == 1
    assert f"{name}/{bombed}" not in {k for b in batches for k in b["keys"]}
    with pytest.raises(DataError, match=rf"{name}: sample '{bombed}' .png is a decompression bomb"):
        epoch_keys(copy)


class _DroppingProxy(http.server.BaseHTTPRequestHandler):
    """Forwards requests to the S3 server (moto); the first GET of each shard gets half its body and
    a dropped connection. Records every shard GET's Range header."""

    protocol_version = "HTTP/1.1"
    upstream: str
    hits: dict
    ranges: list

    def log_message(self, *args):
        pass

    def _forward(self):
        import urllib.error
        import urllib.request

        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        request = urllib.request.Request(self.upstream + self.path, data=body, method=self.command,
                                         headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        try:
            response = urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as e:
            response = e
        data = response.read()
        first_shard_get = False
        if self.command == "GET" and ".tar" in self.path.split("?")[0]:
            self.ranges.append(self.headers.get("Range"))
            n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
            first_shard_get = n == 1
        self.send_response(response.status if hasattr(response, "status") else response.code)
        for k, v in response.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if first_shard_get and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward


def test_s3_reads_resume_after_a_dropped_connection(dataset, s3_env, monkeypatch):
    client, bucket = s3_env
    m = load_manifest(dataset)
    for path, rec in zip(m.shard_paths("train"), m.shards("train")):
        client.upload_file(str(path), bucket, f"data/{rec['name']}")
    handler = type("Proxy", (_DroppingProxy,), {"upstream": os.environ["AWS_ENDPOINT_URL"],
                                                 "hits": {}, "ranges": []})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.setattr(storage, "_CLIENTS", {})  # a client for the proxy
        monkeypatch.setattr(storage, "RETRY_BACKOFF_S", 0.01)
        assert epoch_keys(m, base_url=f"s3://{bucket}/data") == epoch_keys(m)
    finally:
        proxy.shutdown()
        proxy.server_close()
    sizes = {rec["bytes"] for rec in m.shards("train")}
    resumed = [r for r in handler.ranges if r]
    assert resumed and all(int(r.split("=")[1].rstrip("-")) * 2 in {s - s % 2 for s in sizes} for r in resumed)
