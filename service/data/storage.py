"""One storage layer for local folders (plain path or file://) and s3://, on pyarrow.fs.

Listing (`FileSelector`), reading (`open_input_stream`), writing
(`open_output_stream`), deleting (`delete_dir`) and copying (`copy_files`
with threads; server-side `CopyObject` within one bucket) all go through a
pyarrow filesystem, so a local folder and a bucket take the same code path,
and Ray Data tasks and Ray Train checkpoints use the same filesystem object.

S3 settings live in one object, `S3Settings` (endpoint, region, keys,
retries), built from the `s3_*` keys of any config (`DataConfig`,
`IngestConfig`). Keys left empty come from the environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, endpoint from
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) when `resolved()` runs on the driver,
and travel inside the pickled settings or filesystem to Ray workers, so
workers need no environment of their own. Retries: pyarrow's
`AwsStandardS3RetryStrategy(max_attempts)` (throttling such as 503 SlowDown,
5xx and connection resets). Secrets never appear in `repr`/`str`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_FIELDS = ("endpoint", "region", "access_key", "secret_key", "max_attempts")
# An AWS SDK misclassification pyarrow's retry strategy never sees: an error
# reply (503 SlowDown's XML body) longer than a small ranged read overflows
# the SDK's preallocated read buffer, curl aborts, and the 503 surfaces as a
# non-retryable INTERNAL_FAILURE "Failed to flush response stream" (analysed
# in apache/doris#66557). Reads that can be small go through `with_retries`.
_OVERFLOWED_ERROR_REPLY = "Failed to flush response stream"
T = TypeVar("T")


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3-compatible store; every field optional."""

    # -- e.g. "http://127.0.0.1:9000" (MinIO, a local server); empty = AWS
    #    (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL).
    endpoint: str = ""
    region: str = "us-east-1"
    # -- Explicit keys; empty = AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    access_key: str = ""
    secret_key: str = ""
    # -- Attempts per request (pyarrow's AWS standard retry strategy).
    max_attempts: int = 10
    # -- Taken from AWS_SESSION_TOKEN by `resolved()` with environment keys.
    session_token: str = ""

    def __repr__(self) -> str:  # secrets never reach logs
        hidden = {name: "***" if getattr(self, name) else "" for name in ("access_key", "secret_key", "session_token")}
        return (f"S3Settings(endpoint={self.endpoint!r}, region={self.region!r}, max_attempts={self.max_attempts}, "
                + ", ".join(f"{k}={v!r}" for k, v in hidden.items()) + ")")

    __str__ = __repr__

    @classmethod
    def from_fields(cls, cfg: Any) -> "S3Settings":
        """From any config with `s3_endpoint`, `s3_region`, `s3_access_key`,
        `s3_secret_key`, `s3_max_attempts` (DataConfig, IngestConfig)."""
        return cls(**{name: getattr(cfg, f"s3_{name}") for name in S3_FIELDS
                      if getattr(cfg, f"s3_{name}", None) not in (None, "")})

    def as_fields(self) -> dict[str, Any]:
        """The inverse of `from_fields`: {"s3_endpoint": ..., ...} for a config's keyword arguments."""
        return {f"s3_{name}": getattr(self, name) for name in S3_FIELDS}

    def resolved(self) -> "S3Settings":
        """Explicit values win; otherwise keys, token and endpoint come from the environment."""
        env = os.environ.get
        explicit_keys = bool(self.access_key and self.secret_key)
        return dataclasses.replace(
            self,
            endpoint=self.endpoint or env("AWS_ENDPOINT_URL_S3", "") or env("AWS_ENDPOINT_URL", ""),
            access_key=self.access_key or env("AWS_ACCESS_KEY_ID", ""),
            secret_key=self.secret_key or env("AWS_SECRET_ACCESS_KEY", ""),
            session_token=self.session_token or ("" if explicit_keys else env("AWS_SESSION_TOKEN", "")),
        )

    @property
    def endpoint_label(self) -> str:
        """The endpoint for messages ("AWS" when none is set)."""
        return self.endpoint or "AWS (no endpoint override)"


DEFAULT_S3 = S3Settings()


def is_s3(uri: str) -> bool:
    """True for s3:// URIs."""
    return uri.startswith("s3://")


def local_path(uri: str) -> str:
    """The filesystem path of a plain path or file:// URI."""
    if uri.startswith("file://"):
        return urlparse(uri).path
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}; use a local path, file:// or s3://")
    return uri


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key")."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.strip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/', whatever the back-end."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def s3_filesystem(s3: S3Settings, max_attempts: Optional[int] = None, connect_timeout: Optional[float] = None):
    """A pyarrow S3FileSystem for resolved settings (cached per settings in a process)."""
    return _s3_filesystem(s3.resolved(), max_attempts or s3.max_attempts, connect_timeout)


@functools.lru_cache(maxsize=16)
def _s3_filesystem(s3: S3Settings, max_attempts: int, connect_timeout: Optional[float]) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": s3.region or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, int(max_attempts))),
        # Ingest writes into an existing bucket; creating one is the operator's call.
        "allow_bucket_creation": False,
    }
    if connect_timeout is not None:
        kwargs["connect_timeout"] = connect_timeout
    if s3.endpoint:
        parsed = urlparse(s3.endpoint if "://" in s3.endpoint else f"https://{s3.endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if s3.access_key and s3.secret_key:
        kwargs.update(access_key=s3.access_key, secret_key=s3.secret_key, session_token=s3.session_token or None)
    return pafs.S3FileSystem(**kwargs)


def with_retries(read: Callable[[], T], max_attempts: int = 10) -> T:
    """`read()`, retried with jittered exponential backoff when it fails only
    because an S3 error reply overflowed a small read (see above); every
    other error is the library's business (already retried) and raised."""
    for attempt in range(1, max_attempts + 1):
        try:
            return read()
        except OSError as err:
            if _OVERFLOWED_ERROR_REPLY not in str(err) or attempt == max_attempts:
                raise
            time.sleep(random.uniform(0, min(2.0, 0.05 * 2 ** attempt)))  # backoff, as the SDK's own retries
    raise AssertionError("unreachable")


def arrow_filesystem(uri: str, s3: S3Settings = DEFAULT_S3) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for `uri` (local paths made absolute)."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))
    bucket, key = split_s3(uri)
    return s3_filesystem(s3), f"{bucket}/{key}".rstrip("/")


def checkpoint_filesystem(path: str, s3: S3Settings) -> tuple[str, Optional[pafs.FileSystem]]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig.

    s3:// gets this layer's S3 filesystem (endpoint, region, keys, retries) and
    the path without its scheme; local folders and file:// become absolute
    paths with no filesystem (Ray Train's default local handling).
    """
    if is_s3(path):
        return arrow_filesystem(path, s3)[1], s3_filesystem(s3)
    return os.path.abspath(local_path(path)), None


def read_bytes(uri: str, s3: S3Settings = DEFAULT_S3) -> bytes:
    """The whole object/file."""
    fs, path = arrow_filesystem(uri, s3)

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return with_retries(read, s3.max_attempts)


def write_bytes(uri: str, data: bytes, s3: S3Settings = DEFAULT_S3) -> None:
    """Create or replace the object/file (local: a temporary file renamed into
    place; an S3 PUT is atomic already)."""
    fs, path = arrow_filesystem(uri, s3)
    make_parent_dirs(fs, path)
    target = f"{path}.tmp-{os.getpid()}" if isinstance(fs, pafs.LocalFileSystem) else path
    with fs.open_output_stream(target) as stream:
        stream.write(data)
    if target != path:
        fs.move(target, path)


def read_json(uri: str, s3: S3Settings = DEFAULT_S3) -> Any:
    """Parse a JSON file."""
    return json.loads(read_bytes(uri, s3).decode("utf-8"))


def write_json(uri: str, obj: Any, s3: S3Settings = DEFAULT_S3) -> None:
    """Write `obj` as indented JSON."""
    write_bytes(uri, (json.dumps(obj, indent=2) + "\n").encode("utf-8"), s3)


def exists(uri: str, s3: S3Settings = DEFAULT_S3) -> bool:
    """Whether a file/object exists (not a prefix)."""
    fs, path = arrow_filesystem(uri, s3)
    return fs.get_file_info(path).type == pafs.FileType.File


@dataclass(frozen=True)
class FileEntry:
    """One listed file: its URI, its path relative to the listed prefix, its size."""

    uri: str
    rel: str
    size: int


def list_files(uri: str, s3: S3Settings = DEFAULT_S3) -> list[FileEntry]:
    """Every file below `uri` (recursive), sorted by relative path; [] when absent.

    Directory entries (including the empty marker objects pyarrow leaves on
    S3 when a folder's last object goes) are not files and are skipped.
    """
    fs, base = arrow_filesystem(uri, s3)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    scheme = "s3://" if is_s3(uri) else ""
    out = [FileEntry(f"{scheme}{info.path}", info.path[len(base):].lstrip("/"), int(info.size or 0))
           for info in infos if info.type == pafs.FileType.File]
    return sorted(out, key=lambda e: e.rel)


def delete_file(uri: str, s3: S3Settings = DEFAULT_S3) -> None:
    """Remove one file/object (no error when absent)."""
    fs, path = arrow_filesystem(uri, s3)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_prefix(uri: str, s3: S3Settings = DEFAULT_S3) -> None:
    """Remove everything below `uri` (no error when absent)."""
    fs, path = arrow_filesystem(uri, s3)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    elif kind == pafs.FileType.Directory:
        if is_s3(uri) and "/" not in path:  # a whole bucket: empty it, never delete it
            fs.delete_dir_contents(path)
        else:
            fs.delete_dir(path)


def copy_tree(src: str, dst: str, s3: S3Settings = DEFAULT_S3) -> int:
    """Copy every file below `src` to the same relative paths below `dst`
    (any back-end pair; threads; server-side within one S3 store); returns files copied."""
    src_fs, src_path = arrow_filesystem(src, s3)
    dst_fs, dst_path = arrow_filesystem(dst, s3)
    count = len(list_files(src, s3))
    if count:
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs,
                        use_threads=True)
    return count


def move_prefix(src: str, dst: str, s3: S3Settings = DEFAULT_S3) -> None:
    """Move everything below `src` to below `dst` (which must not exist yet).

    Local: one atomic rename. S3 has no rename: server-side copy, then delete.
    """
    if is_s3(src) != is_s3(dst):
        raise ValueError(f"cannot move between back-ends: {src!r} -> {dst!r}")
    if is_s3(src):
        copy_tree(src, dst, s3)
        delete_prefix(src, s3)
        return
    fs, src_path = arrow_filesystem(src)
    dst_path = arrow_filesystem(dst)[1]
    make_parent_dirs(fs, dst_path)
    fs.move(src_path, dst_path)


def make_parent_dirs(fs: pafs.FileSystem, path: str) -> None:
    """Create the parent folder of `path` on local filesystems (S3 needs none, and
    a directory marker object there would show up in other tools' listings)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)


class RangeReader:
    """A read-only, forward-only file object over bytes [start, start+length) of a pyarrow file.

    Lets `tarfile` stream through a byte range of a remote archive (an inner
    class tar of ILSVRC2012_img_train.tar) with a few large reads instead of
    one request per tar header.
    """

    def __init__(self, handle: Any, start: int, length: int, chunk: int = 8 << 20, max_attempts: int = 10):
        self._handle, self._pos, self._end, self._chunk = handle, start, start + length, chunk
        self._max_attempts = max_attempts
        self._buf, self._off = b"", 0  # unread data is self._buf[self._off:]

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all that remain when negative)."""
        available = len(self._buf) - self._off
        if size is None or size < 0:
            size = available + self._end - self._pos
        if available < size and self._pos < self._end:
            n = min(max(self._chunk, size - available), self._end - self._pos)
            chunk = with_retries(lambda: self._handle.read_at(n, self._pos), self._max_attempts)
            self._buf = self._buf[self._off:] + chunk
            self._off, self._pos = 0, self._pos + n
        out = self._buf[self._off:self._off + size]
        self._off += len(out)
        return out
