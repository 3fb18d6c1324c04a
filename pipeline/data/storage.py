"""Every byte data/ reads from or writes to a location: local files, file://, http(s)://, s3://, pipe:.

Reading (`open_url`, `read_url`, `object_size`):

- a local path or ``file://`` URL is opened as a file;
- ``http(s)://`` and ``s3://`` are streamed with bounded retries: a transient failure (connection
  refused, reset or dropped mid-body, a timeout, HTTP 408/429/5xx, S3 throttling or 5xx) is retried
  up to `RETRY_ATTEMPTS` times in a row with a backoff of `RETRY_BACKOFF_S` doubling to
  `RETRY_MAX_BACKOFF_S`, and the read resumes at the byte it had reached (HTTP ``Range``, S3's
  ``Range``), so a dropped connection costs the bytes in flight, not the shard. A permanent error
  (HTTP 404/410 or another 4xx, S3 NoSuchKey, retries exhausted) is a `DataError` naming the URL;
- ``pipe:<command>`` runs the command with a shell and reads its stdout (``pipe:curl -s URL``,
  ``pipe:aws s3 cp URL -``); a non-zero exit status is a `DataError` naming the command. Its size
  cannot be asked in advance (`object_size` gives None); the reader checks it.

Writing: `OutputTarget`, a dataset folder that is local or an S3 prefix (``s3://bucket/prefix``).
Local files are written through `pipeline.atomic` (a unique temporary beside the file, renamed
into place); S3 objects are uploaded whole, which S3 makes visible atomically. A target holds only
strings, so it can be handed to worker processes, each of which opens its own client.

S3 goes through boto3 (the optional ``s3`` extra). Credentials, region and endpoint come from the
usual AWS environment variables and files; ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
points at an S3-compatible server such as MinIO or moto.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pipeline.atomic import atomic_path, write_bytes
from pipeline.data.errors import DataError, MissingObject

URL_SCHEMES = ("s3://", "http://", "https://", "pipe:")
RETRY_ATTEMPTS = 6
"""Tries in a row, the first included, before a read from HTTP or S3 gives up."""
RETRY_BACKOFF_S = 0.25
RETRY_MAX_BACKOFF_S = 4.0
TIMEOUT_S = 60.0
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
_MISSING_HTTP = {404, 410}
_MISSING_S3 = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_TRANSIENT_S3 = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                 "RequestTimeout", "Throttling", "ThrottlingException"}

_CLIENTS: dict[int, object] = {}  # one boto3 client per process (clients are not fork/pickle safe)
_CLIENT_LOCK = threading.Lock()  # creating a client is not thread-safe; using one is


def is_url(location: str | Path) -> bool:
    """True for an s3://, http(s):// or pipe: URL (a Path never is: it collapses the "//")."""
    return isinstance(location, str) and location.startswith(URL_SCHEMES)


def s3_client():
    """A boto3 S3 client configured from the AWS_* environment (AWS_ENDPOINT_URL honoured)."""
    pid = os.getpid()
    with _CLIENT_LOCK:
        if pid not in _CLIENTS:
            try:
                import boto3  # here: an optional dependency, needed only for s3://
            except ImportError:
                raise DataError("s3:// needs boto3: pip install 'vitpipe[s3]'") from None
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
            _CLIENTS[pid] = boto3.client("s3", endpoint_url=endpoint)
        return _CLIENTS[pid]


class UrlError(DataError):
    """A location that cannot be read; `detail` is the why without the location."""

    def __init__(self, url: str, detail: str):
        super().__init__(f"{url}: {detail}")
        self.url, self.detail = url, detail


class _Missing(UrlError, MissingObject):
    """No object at the location (HTTP 404/410, S3 NoSuchKey, no such file)."""


class _Transient(Exception):
    """A failure worth another try (a refused or dropped connection, a timeout, a 5xx or 429)."""


def _s3_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""


def _local_path(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


# --------------------------------------------------------------------------- reading with retries


class _ResumingStream(io.RawIOBase):
    """A remote object read from start to end, reopened at the byte reached after a transient failure.

    `open_at(offset)` returns (body, total size or None); it raises `_Transient` for a failure worth
    another try and `UrlError` for one that is not. A body that ends before the total size is a
    dropped connection, not the end.
    """

    def __init__(self, url: str, open_at: Callable[[int], tuple[object, int | None]]):
        self.url, self._open_at = url, open_at
        self.offset, self.total, self.body = 0, None, None
        self._failures = 0  # in a row, without a byte of progress
        self._connect()

    def _failed(self, error: Exception) -> None:
        """Count a failure; wait before the next try, or give up naming the URL."""
        self._failures += 1
        if self._failures >= RETRY_ATTEMPTS:
            where = f" at byte {self.offset}" if self.offset else ""
            raise UrlError(self.url, f"gave up after {RETRY_ATTEMPTS} attempts{where} ({error})")
        time.sleep(min(RETRY_MAX_BACKOFF_S, RETRY_BACKOFF_S * 2 ** (self._failures - 1)))

    def _connect(self) -> None:
        while True:
            try:
                self.body, total = self._open_at(self.offset)
                break
            except _Transient as e:
                self._failed(e)
        if total is not None:
            self.total = total

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        while True:
            try:
                data = self.body.read(n)
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                error: Exception = e
            except Exception as e:  # botocore/urllib3 streaming errors are not OSErrors
                if type(e).__module__.split(".")[0] not in ("botocore", "urllib3"):
                    raise
                error = e
            else:
                if data or not n or self.total is None or self.offset >= self.total:
                    if data:
                        self._failures = 0
                    self.offset += len(data)
                    return data
                error = ConnectionError(f"connection closed at byte {self.offset} of {self.total}")
            self._failed(_Transient(f"{type(error).__name__}: {error}"))
            self._close_body()
            self._connect()

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _close_body(self) -> None:
        with contextlib.suppress(Exception):
            self.body.close()

    def close(self) -> None:
        if not self.closed:
            self._close_body()
        super().close()


def _http_open_at(url: str) -> Callable[[int], tuple[object, int | None]]:
    def open_at(offset: int):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code in _MISSING_HTTP:
                raise _Missing(url, f"cannot open (HTTP {e.code} {e.reason})") from None
            if e.code in _TRANSIENT_HTTP:
                raise _Transient(f"HTTP {e.code} {e.reason}") from None
            raise UrlError(url, f"cannot open (HTTP {e.code} {e.reason})") from None
        except (OSError, http.client.HTTPException) as e:  # URLError, refused, reset, timeouts
            raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        length = response.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        if offset and response.status == 206:
            match = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
            return response, int(match.group(1)) if match else (size + offset if size is not None else None)
        if offset:  # the server ignored the range: skip what was already read
            remaining = offset
            while remaining:
                skipped = response.read(min(remaining, 1 << 20))
                if not skipped:
                    raise _Transient(f"connection closed while skipping to byte {offset}")
                remaining -= len(skipped)
        return response, size

    return open_at


def _s3_open_at(url: str) -> Callable[[int], tuple[object, int | None]]:
    bucket, _, key = url[len("s3://"):].partition("/")

    def open_at(offset: int):
        try:
            client = s3_client()  # one per process, from the usual AWS_* environment variables
        except DataError as e:
            raise UrlError(url, str(e)) from None
        try:
            extra = {"Range": f"bytes={offset}-"} if offset else {}
            response = client.get_object(Bucket=bucket, Key=key, **extra)
        except Exception as e:  # botocore's ClientError and connection errors
            code = _s3_code(e)
            if code in _MISSING_S3:
                raise _Missing(url, f"cannot open ({e})") from None
            if code and code not in _TRANSIENT_S3:
                raise UrlError(url, f"cannot open ({e})") from None
            raise _Transient(f"{type(e).__name__}: {e}") from None
        length = response.get("ContentLength")
        return response["Body"], (int(length) + offset if length is not None else None)

    return open_at


class _PipeStream(io.RawIOBase):
    """stdout of a `pipe:` command; its exit status is checked when the stream is closed."""

    def __init__(self, url: str):
        self.url = url
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n if n is not None and n >= 0 else -1)

    def readinto(self, b) -> int:
        data = self.proc.stdout.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            code = self.proc.wait()
            super().close()
            if code != 0:
                raise UrlError(self.url, f"command exited with status {code}")


def open_url(location: str):
    """A readable binary stream for a local path, file://, http(s)://, s3:// or pipe:<command> URL.

    HTTP and S3 reads retry transient failures and resume where they stopped (see the module doc).
    Errors are `DataError`s naming the location; a missing object is a `MissingObject`.
    """
    if location.startswith("pipe:"):
        return _PipeStream(location)
    if location.startswith(("http://", "https://")):
        return _ResumingStream(location, _http_open_at(location))
    if location.startswith("s3://"):
        return _ResumingStream(location, _s3_open_at(location))
    try:
        return open(_local_path(location), "rb")
    except FileNotFoundError:
        raise _Missing(location, "no such file") from None
    except OSError as e:
        raise UrlError(location, f"cannot open ({e.strerror})") from None


def read_url(url: str, what: str = "manifest") -> bytes:
    """The bytes at a location (see `open_url`); a DataError naming it and `what` if they cannot be read."""
    try:
        stream = open_url(url)
    except UrlError as e:
        raise type(e)(url, f"cannot fetch the {what} ({e.detail})") from None
    try:
        return stream.read()
    except DataError as e:
        raise DataError(f"{url}: reading the {what} failed ({e})") from None
    except Exception as e:  # OS, HTTP and botocore errors while the body streams
        raise DataError(f"{url}: reading the {what} failed ({type(e).__name__}: {e})") from None
    finally:
        stream.close()


# --------------------------------------------------------------------------- sizes without reading


def object_size(location: str, timeout: float = TIMEOUT_S) -> int | None:
    """Size in bytes of the object at a location, or None when it cannot be known without reading
    it (a pipe: command, an HTTP server that gives no Content-Length or does not answer HEAD).

    Raises MissingObject when there is no such object, and DataError naming the location for any
    other failure (no permission, unreachable server).
    """
    if location.startswith("pipe:"):
        return None
    if location.startswith("s3://"):
        return _s3_size(location)
    if location.startswith(("http://", "https://")):
        return _http_size(location, timeout)
    path = Path(_local_path(location))
    if not path.is_file():
        raise _Missing(location, "no such file")
    return path.stat().st_size


def _s3_size(url: str) -> int:
    """ContentLength of a HeadObject on `url`."""
    bucket, _, key = url[len("s3://"):].partition("/")
    try:
        return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    except DataError:
        raise
    except Exception as e:  # botocore's ClientError and connection errors
        if _s3_code(e) in _MISSING_S3:
            raise _Missing(url, "no such object") from None
        raise UrlError(url, f"cannot check the object ({type(e).__name__}: {e})") from None


def _http_size(url: str, timeout: float) -> int | None:
    """Content-Length of a HEAD on `url`; None when the server gives none or does not answer HEAD."""
    last: Exception | None = None
    for n in range(RETRY_ATTEMPTS):
        if n:
            time.sleep(min(RETRY_MAX_BACKOFF_S, RETRY_BACKOFF_S * 2 ** (n - 1)))
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
                length = response.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
        except urllib.error.HTTPError as e:
            if e.code in _MISSING_HTTP:
                raise _Missing(url, f"HTTP {e.code} {e.reason}") from None
            if e.code in (405, 501):  # HEAD not supported: the GET that reads the shard will tell
                return None
            if e.code not in _TRANSIENT_HTTP:
                raise UrlError(url, f"HEAD failed (HTTP {e.code} {e.reason})") from None
            last = e
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, refused connections
            last = e
    raise UrlError(url, f"cannot reach ({last}; gave up after {RETRY_ATTEMPTS} attempts)")


# --------------------------------------------------------------------------- writing


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
        if "://" in text or text.startswith("pipe:"):
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

    def child(self, folder: str) -> OutputTarget:
        """The target of a subfolder (names relative to it)."""
        return OutputTarget.parse(f"{self.url.rstrip('/')}/{folder}")

    @contextlib.contextmanager
    def writing(self, name: str, scratch: str | None = None) -> Iterator[Path]:
        """Yield a local path to write `name` into; on success it becomes `name` (an atomic rename
        locally, one upload on S3), on failure nothing of it is left. `scratch` holds S3's temporary."""
        if not self.is_s3:
            with atomic_path(Path(self.local) / name) as tmp:
                yield tmp
            return
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=scratch)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            try:
                s3_client().upload_file(str(tmp), self.bucket, self.key(name))
            except DataError:
                raise
            except Exception as e:  # botocore raises many unrelated types; name the object
                raise DataError(f"{self.location(name)}: upload failed ({type(e).__name__}: {e})") from None
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, data: bytes, name: str) -> None:
        """Write `data` as `name` (atomically: a local temporary and rename, or one PUT)."""
        if self.is_s3:
            try:
                s3_client().put_object(Bucket=self.bucket, Key=self.key(name), Body=data)
            except Exception as e:
                raise DataError(f"{self.location(name)}: upload failed ({type(e).__name__}: {e})") from None
            return
        write_bytes(Path(self.local) / name, data)

    def get_bytes(self, name: str) -> bytes:
        """Read `name` back."""
        return read_url(self.location(name), what=name)

    def delete(self, name: str) -> None:
        """Remove `name` if it exists."""
        if self.is_s3:
            s3_client().delete_object(Bucket=self.bucket, Key=self.key(name))
        else:
            (Path(self.local) / name).unlink(missing_ok=True)

    def list(self, folder: str = "") -> list[str]:
        """Names (relative to the target) of the files directly in `folder` ("" for the target itself)."""
        join = (lambda n: f"{folder}/{n}") if folder else (lambda n: n)
        if not self.is_s3:
            d = Path(self.local) / folder
            return sorted(join(p.name) for p in d.iterdir() if p.is_file()) if d.is_dir() else []
        names = []
        listing = self.key(folder) + "/" if folder else (f"{self.prefix}/" if self.prefix else "")
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=listing)
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in pages:
            names.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(names)
