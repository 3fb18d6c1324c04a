"""Where `prepare` writes: a local folder or an S3 prefix (``s3://bucket/prefix``).

S3 goes through boto3 (the optional ``s3`` extra). Credentials, region and endpoint come from the
usual AWS environment variables and files; ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
points at an S3-compatible server such as MinIO or moto. A target holds only strings, so it can
be handed to worker processes, each of which opens its own client.

`url_size` asks an s3:// or http(s):// URL for an object's size without downloading it (S3
HeadObject, HTTP HEAD): the cheap existence check of datasets read from object storage.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.manifest import DataError

_CLIENTS: dict[int, object] = {}  # one boto3 client per process (clients are not fork/pickle safe)
_CLIENT_LOCK = threading.Lock()  # creating a client is not thread-safe; using one is


def s3_client():
    """A boto3 S3 client configured from the AWS_* environment (AWS_ENDPOINT_URL honoured)."""
    pid = os.getpid()
    with _CLIENT_LOCK:
        if pid not in _CLIENTS:
            try:
                import boto3
            except ImportError:
                raise DataError("s3:// needs boto3: pip install 'vitpipe[s3]'") from None
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
            _CLIENTS[pid] = boto3.client("s3", endpoint_url=endpoint)
        return _CLIENTS[pid]


# --------------------------------------------------------------------------- object sizes at URLs


class MissingObject(DataError):
    """The URL names no object (HTTP 404/410, S3 NoSuchKey)."""


_MISSING_S3_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_MISSING_HTTP_CODES = {404, 410}


def url_size(url: str, timeout: float = 60) -> int | None:
    """Size in bytes of the object at an s3:// or http(s):// URL, or None if the server does not say.

    Raises MissingObject when there is no such object, and DataError naming the URL for any other
    failure (no permission, unreachable server).
    """
    if url.startswith("s3://"):
        return _s3_size(url)
    if url.startswith(("http://", "https://")):
        return _http_size(url, timeout)
    raise DataError(f"{url}: not an s3:// or http(s):// URL")


def _s3_size(url: str) -> int:
    """ContentLength of a HeadObject on `url`."""
    bucket, _, key = url[len("s3://"):].partition("/")
    try:
        return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    except DataError:
        raise
    except Exception as e:  # botocore's ClientError and connection errors
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
        if code in _MISSING_S3_CODES:
            raise MissingObject(f"{url}: no such object") from None
        raise DataError(f"{url}: cannot check the object ({type(e).__name__}: {e})") from None


def _http_size(url: str, timeout: float) -> int | None:
    """Content-Length of a HEAD on `url`; None when the server gives none or does not answer HEAD."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            length = response.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        if e.code in _MISSING_HTTP_CODES:
            raise MissingObject(f"{url}: HTTP {e.code} {e.reason}") from None
        if e.code in (405, 501):  # HEAD not supported: the GET that reads the shard will tell
            return None
        raise DataError(f"{url}: HEAD failed (HTTP {e.code} {e.reason})") from None
    except OSError as e:  # URLError, timeouts, refused connections
        raise DataError(f"{url}: cannot reach ({e})") from None
    return int(length) if length and length.isdigit() else None


@dataclass(frozen=True)
class OutputTarget:
    """A dataset folder: `local` path, or `bucket` + `prefix` on S3. Names are relative ("shards/x.tar")."""

    url: str
    local: str | None = None
    bucket: str | None = None
    prefix: str = ""

    @staticmethod
    def parse(out: str | Path) -> OutputTarget:
        """`s3://bucket/prefix` or a local folder path."""
        text = str(out)
        if text.startswith("s3://"):
            bucket, _, prefix = text[len("s3://") :].partition("/")
            if not bucket:
                raise DataError(f"{text}: expected s3://bucket/prefix")
            return OutputTarget(url=text.rstrip("/"), bucket=bucket, prefix=prefix.strip("/"))
        if "://" in text:
            raise DataError(f"{text}: unsupported output; use a local folder or s3://bucket/prefix")
        return OutputTarget(url=text, local=str(Path(text).expanduser()))

    @property
    def is_s3(self) -> bool:
        """True for an s3:// target."""
        return self.bucket is not None

    def key(self, name: str) -> str:
        """The S3 object key of `name`."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def location(self, name: str) -> str:
        """Where `name` ends up: a local path or an s3:// URL."""
        return f"s3://{self.bucket}/{self.key(name)}" if self.is_s3 else str(Path(self.local) / name)

    def put_file(self, src: Path, name: str) -> None:
        """Move the finished local file `src` to `name` (atomic rename locally, an upload on S3)."""
        if self.is_s3:
            try:
                s3_client().upload_file(str(src), self.bucket, self.key(name))
            except Exception as e:  # botocore raises many unrelated types; name the object
                raise DataError(f"{self.location(name)}: upload failed ({type(e).__name__}: {e})") from e
            src.unlink(missing_ok=True)
        else:
            dest = Path(self.local) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)

    def put_bytes(self, data: bytes, name: str) -> None:
        """Write `data` as `name` (a local temporary file and rename, or one PUT)."""
        if self.is_s3:
            try:
                s3_client().put_object(Bucket=self.bucket, Key=self.key(name), Body=data)
            except Exception as e:
                raise DataError(f"{self.location(name)}: upload failed ({type(e).__name__}: {e})") from e
            return
        dest = Path(self.local) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, name: str) -> bytes:
        """Read `name` back."""
        if self.is_s3:
            try:
                return s3_client().get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
            except Exception as e:
                raise DataError(f"{self.location(name)}: cannot read ({type(e).__name__}: {e})") from e
        return (Path(self.local) / name).read_bytes()

    def delete(self, name: str) -> None:
        """Remove `name` if it exists."""
        if self.is_s3:
            s3_client().delete_object(Bucket=self.bucket, Key=self.key(name))
        else:
            (Path(self.local) / name).unlink(missing_ok=True)

    def list(self, folder: str) -> list[str]:
        """Names (relative to the target) of the files directly in `folder`."""
        if not self.is_s3:
            d = Path(self.local) / folder
            return sorted(f"{folder}/{p.name}" for p in d.iterdir() if p.is_file()) if d.is_dir() else []
        names = []
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key(folder) + "/")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in pages:
            names.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(names)
