"""One URI, two back-ends: a local folder (plain path or file://) or s3://.

Control-plane access (listing, small JSON files, moving a staging prefix into
place) goes through boto3 for S3 and `os`/`shutil` for local paths. The data
plane (Parquet shards, byte ranges of tar archives) goes through a pyarrow
filesystem from `arrow_filesystem`, which is also what Ray Data reads with, so
a local folder and a bucket take the same code path.

S3 settings: an endpoint override (MinIO, a local S3 server), a region and
optional explicit keys; without explicit keys the usual AWS environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the default chain is used.
Keys are resolved on the driver and travel inside the pickled filesystem to
Ray workers, so workers need no environment of their own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3-compatible store; all fields optional."""

    # -- e.g. "http://127.0.0.1:9000"; empty = AWS.
    endpoint: str = ""
    region: str = "us-east-1"
    # -- Explicit keys; empty = AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    access_key: str = ""
    secret_key: str = ""

    def __repr__(self) -> str:  # secrets never reach logs
        return (
            f"S3Settings(endpoint={self.endpoint!r}, region={self.region!r}, "
            f"access_key={'***' if self.access_key else ''!r}, secret_key={'***' if self.secret_key else ''!r})"
        )

    @classmethod
    def from_data_config(cls, data_cfg: Any) -> "S3Settings":
        """Build from `service.config.DataConfig` (fields s3_*)."""
        return cls(
            endpoint=data_cfg.s3_endpoint or "",
            region=data_cfg.s3_region or "us-east-1",
            access_key=data_cfg.s3_access_key or "",
            secret_key=data_cfg.s3_secret_key or "",
        )

    def resolved(self) -> "S3Settings":
        """Explicit keys win; otherwise take them (and the endpoint) from the environment."""
        return dataclasses.replace(
            self,
            endpoint=self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3", "") or os.environ.get("AWS_ENDPOINT_URL", ""),
            access_key=self.access_key or os.environ.get("AWS_ACCESS_KEY_ID", ""),
            secret_key=self.secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        )


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
    return parsed.netloc, parsed.path.lstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/', whatever the back-end."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def arrow_filesystem(uri: str, s3: S3Settings = DEFAULT_S3) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for `uri`.

    For S3 the filesystem carries the endpoint override, region, resolved keys
    and a standard retry strategy (transient 5xx/throttling are retried).
    """
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))
    s3 = s3.resolved()
    kwargs: dict[str, Any] = {
        "region": s3.region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5),
    }
    if s3.endpoint:
        parsed = urlparse(s3.endpoint if "://" in s3.endpoint else f"https://{s3.endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if s3.access_key and s3.secret_key:
        kwargs["access_key"] = s3.access_key
        kwargs["secret_key"] = s3.secret_key
    bucket, key = split_s3(uri)
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def boto3_client(s3: S3Settings = DEFAULT_S3):
    """A boto3 S3 client honouring the endpoint override and explicit keys."""
    import boto3  # imported lazily: local-only runs never need it
    from botocore.config import Config as BotoConfig

    s3 = s3.resolved()
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint or None,
        region_name=s3.region,
        aws_access_key_id=s3.access_key or None,
        aws_secret_access_key=s3.secret_key or None,
        config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"}),
    )


def read_bytes(uri: str, s3: S3Settings = DEFAULT_S3) -> bytes:
    """The whole object/file."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return boto3_client(s3).get_object(Bucket=bucket, Key=key)["Body"].read()
    with open(local_path(uri), "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes, s3: S3Settings = DEFAULT_S3) -> None:
    """Create or replace the object/file (local: via a temporary file and rename)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        boto3_client(s3).put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = local_path(uri)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_json(uri: str, s3: S3Settings = DEFAULT_S3) -> Any:
    """Parse a JSON file."""
    return json.loads(read_bytes(uri, s3).decode("utf-8"))


def write_json(uri: str, obj: Any, s3: S3Settings = DEFAULT_S3) -> None:
    """Write `obj` as indented JSON."""
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"), s3)


def exists(uri: str, s3: S3Settings = DEFAULT_S3) -> bool:
    """Whether a file/object exists (not a prefix)."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            boto3_client(s3).head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return os.path.isfile(local_path(uri))


@dataclass(frozen=True)
class FileEntry:
    """One listed file: its URI, its path relative to the listed prefix, its size."""

    uri: str
    rel: str
    size: int


def list_files(uri: str, s3: S3Settings = DEFAULT_S3) -> list[FileEntry]:
    """Every file below `uri` (recursive), sorted by relative path."""
    out: list[FileEntry] = []
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        paginator = boto3_client(s3).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if rel and not rel.endswith("/"):
                    out.append(FileEntry(f"s3://{bucket}/{obj['Key']}", rel, int(obj["Size"])))
    else:
        root = local_path(uri)
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                out.append(FileEntry(full, rel, os.path.getsize(full)))
    out.sort(key=lambda e: e.rel)
    return out


def delete_file(uri: str, s3: S3Settings = DEFAULT_S3) -> None:
    """Remove one file/object (no error when absent)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        boto3_client(s3).delete_object(Bucket=bucket, Key=key)
    elif os.path.isfile(local_path(uri)):
        os.remove(local_path(uri))


def make_parent_dirs(fs: pafs.FileSystem, path: str) -> None:
    """Create the parent folder of `path` on local filesystems (S3 needs none, and
    a directory marker object there would show up in listings)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)


def delete_prefix(uri: str, s3: S3Settings = DEFAULT_S3) -> None:
    """Remove everything below `uri` (no error when absent)."""
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        client = boto3_client(s3)
        keys = [split_s3(e.uri)[1] for e in list_files(uri, s3)]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
        return
    shutil.rmtree(local_path(uri), ignore_errors=True)


def move_prefix(src: str, dst: str, s3: S3Settings = DEFAULT_S3) -> None:
    """Move everything below `src` to below `dst` (which must not exist yet).

    Local: one atomic rename. S3 has no rename: server-side copy then delete.
    """
    if is_s3(src) != is_s3(dst):
        raise ValueError(f"cannot move between back-ends: {src!r} -> {dst!r}")
    if is_s3(src):
        client = boto3_client(s3)
        dst_bucket, dst_key = split_s3(dst)
        for entry in list_files(src, s3):
            bucket, key = split_s3(entry.uri)
            client.copy_object(Bucket=dst_bucket, Key=f"{dst_key.rstrip('/')}/{entry.rel}",
                               CopySource={"Bucket": bucket, "Key": key})
        delete_prefix(src, s3)
        return
    os.makedirs(os.path.dirname(os.path.abspath(local_path(dst))), exist_ok=True)
    os.replace(local_path(src), local_path(dst))


def upload_dir(local_dir: str, uri: str, s3: S3Settings = DEFAULT_S3) -> int:
    """Copy a local folder below an s3:// prefix (or a local one); returns files copied."""
    count = 0
    for entry in list_files(local_dir):
        target = join(uri, entry.rel)
        if is_s3(uri):
            bucket, key = split_s3(target)
            boto3_client(s3).upload_file(entry.uri, bucket, key)
        else:
            os.makedirs(os.path.dirname(local_path(target)), exist_ok=True)
            shutil.copyfile(entry.uri, local_path(target))
        count += 1
    return count


class RangeReader:
    """A read-only, forward-only file object over bytes [start, start+length) of a pyarrow file.

    Lets `tarfile` stream through a byte range of a remote archive (an inner
    class tar of ILSVRC2012_img_train.tar) with a few large reads instead of
    one request per tar header.
    """

    def __init__(self, handle: Any, start: int, length: int, chunk: int = 8 << 20):
        self._handle, self._pos, self._end, self._chunk = handle, start, start + length, chunk
        self._buf, self._off = b"", 0  # unread data is self._buf[self._off:]

    def read(self, size: int = -1) -> bytes:
        available = len(self._buf) - self._off
        if size is None or size < 0:
            size = available + self._end - self._pos
        if available < size and self._pos < self._end:
            n = min(max(self._chunk, size - available), self._end - self._pos)
            self._buf = self._buf[self._off:] + self._handle.read_at(n, self._pos)
            self._off, self._pos = 0, self._pos + n
        out = self._buf[self._off:self._off + size]
        self._off += len(out)
        return out
