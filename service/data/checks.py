"""Checks at the edges: bad paths, buckets, endpoints and credentials, found
before Ray starts, each a one-line `DataInputError` naming the path or key and
what to do.

`check_data_root` is what the training CLI calls before it starts Ray;
`check_ingest_source` / `check_ingest_dest` are what `run_ingest` calls
before it lists or writes anything. Config key names in messages take a
prefix (`data.` for training, none for the ingest CLI) so they name the key
the user typed.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from service.data import storage
from service.data.meta import META_FILE, REPORT_FILE, SHARDS_DIR, DatasetMeta

# What an ingest writes below its destination (anything else there is the user's).
INGEST_OUTPUTS = (SHARDS_DIR, "_staging", META_FILE, REPORT_FILE, "demo_params.json")
INGEST_HINT = "python -m service.ingest source=<raw dataset> dest={root}"


class DataInputError(ValueError):
    """A data path, layout, bucket, endpoint or credential the user gave is wrong.

    The message is one line naming it and what to do; entry points print it
    without a traceback.
    """


def _default_chain_has_credentials() -> bool:
    """Whether AWS's default chain (shared files, SSO, web identity, instance
    role) finds credentials.

    boto3 here because pyarrow cannot say: with no credentials its S3 client
    silently signs nothing, and the failure shows up later (in a worker) as
    an access error. Set AWS_EC2_METADATA_DISABLED=true where no instance
    metadata service exists, to skip its 1 s probe.
    """
    import botocore.session

    return botocore.session.get_session().get_credentials() is not None


def _explain_s3_error(err: OSError, uri: str, s3: storage.S3Settings, prefix: str) -> str:
    text = str(err)
    endpoint = s3.endpoint_label
    if "NETWORK_CONNECTION" in text or "curlCode: 7" in text:
        return (f"cannot connect to the S3 endpoint {endpoint} for {uri}: check that the server runs and that "
                f"{prefix}s3_endpoint (or AWS_ENDPOINT_URL) is right")
    if "curlCode: 6" in text:
        return f"cannot resolve the S3 endpoint host {endpoint} for {uri}: fix {prefix}s3_endpoint"
    if any(code in text for code in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
        return (f"S3 at {endpoint} refused the credentials for {uri}: check AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY (or {prefix}s3_access_key / {prefix}s3_secret_key)")
    first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"cannot access {uri} at {endpoint}: {first_line}"


def check_s3_location(uri: str, s3: storage.S3Settings, prefix: str = "data.") -> None:
    """Credentials present, endpoint reachable, bucket exists; else `DataInputError`.

    Probes with at most 2 attempts so a wrong endpoint fails in seconds, not
    after the full retry budget.
    """
    resolved = s3.resolved()
    if not (resolved.access_key and resolved.secret_key) and not _default_chain_has_credentials():
        raise DataInputError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            f"(or {prefix}s3_access_key and {prefix}s3_secret_key)")
    bucket, _key = storage.split_s3(uri)
    if not bucket:
        raise DataInputError(f"{uri} names no bucket; use s3://<bucket>/<prefix>")
    fs = storage.s3_filesystem(resolved, max_attempts=2, connect_timeout=5)
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise DataInputError(_explain_s3_error(err, uri, resolved, prefix)) from None
    if info.type == pafs.FileType.NotFound:
        raise DataInputError(f"bucket {bucket!r} does not exist at {resolved.endpoint_label}: create it, "
                             f"or fix the bucket name in {uri}")


def check_data_root(root: str, s3: storage.S3Settings, prefix: str = "data.") -> DatasetMeta:
    """The dataset at `root` is reachable and ingested; returns its meta.json.

    Raises `DataInputError` (a ValueError) naming the path, bucket, endpoint
    or credential at fault; call it before Ray starts.
    """
    from service.data.meta import load_meta

    hint = INGEST_HINT.format(root=root)
    if not root:
        raise DataInputError(f"{prefix}root is empty: give the folder or s3:// URI of an ingested dataset")
    if storage.is_s3(root):
        check_s3_location(root, s3, prefix)
    else:
        path = storage.local_path(root)
        if not os.path.exists(path):
            raise DataInputError(f"{prefix}root={root} does not exist: give an ingested dataset ({hint})")
        if not os.path.isdir(path):
            raise DataInputError(f"{prefix}root={root} is a file, not a dataset folder")
    try:
        found = storage.exists(storage.join(root, META_FILE), s3)
    except OSError as err:
        raise DataInputError(_explain_s3_error(err, root, s3.resolved(), prefix)) from None
    if not found:
        raise DataInputError(f"{prefix}root={root} holds no {META_FILE} (not an ingested dataset, or an ingest "
                             f"that did not finish): run {hint}")
    try:
        return load_meta(root, s3)
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise DataInputError(f"{storage.join(root, META_FILE)} is not valid JSON ({err}): re-run {hint}") from None


def check_ingest_source(source: str, s3: storage.S3Settings) -> None:
    """The raw dataset folder/prefix exists and holds something."""
    if storage.is_s3(source):
        check_s3_location(source, s3, prefix="")
        fs, path = storage.arrow_filesystem(source, s3)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise DataInputError(f"source={source} holds no objects: give the prefix of the raw dataset")
        return
    path = storage.local_path(source)
    if not os.path.exists(path):
        raise DataInputError(f"source={source} does not exist: give the folder holding the raw dataset "
                             "(train/<wnid>/..., ILSVRC2012_img_train.tar or ILSVRC/Data/CLS-LOC/)")
    if not os.path.isdir(path):
        raise DataInputError(f"source={source} is a file: give the folder holding the raw dataset")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataInputError(f"source={source} is not readable by this user")


def _relative_inside(path: str, folder: str) -> str:
    """`path` relative to `folder` when it lies inside it ("." when equal), else ""."""
    if storage.is_s3(path) != storage.is_s3(folder):
        return ""
    if storage.is_s3(path):
        path, folder = path.rstrip("/"), folder.rstrip("/")
        return "." if path == folder else path[len(folder) + 1:] if path.startswith(folder + "/") else ""
    rel = os.path.relpath(os.path.abspath(storage.local_path(path)), os.path.abspath(storage.local_path(folder)))
    return "" if rel.startswith("..") else rel.replace(os.sep, "/")


def check_ingest_dest(dest: str, source: str, s3: storage.S3Settings) -> None:
    """The destination can be written and holds nothing but earlier ingest
    output (or the raw source itself, as `generate_demo_dataset` lays it out)."""
    if storage.is_s3(dest):
        check_s3_location(dest, s3, prefix="")
    else:
        path = os.path.abspath(storage.local_path(dest))
        if os.path.exists(path) and not os.path.isdir(path):
            raise DataInputError(f"dest={dest} is a file: give a folder (new or empty) for the dataset")
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise DataInputError(f"dest={dest} cannot be created: {parent} is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DataInputError(f"dest={dest} is not writable by this user ({parent})")
    source_rel = _relative_inside(source, dest)
    if source_rel == ".":
        raise DataInputError(f"dest={dest} is the source folder itself: give a separate folder for the dataset")
    foreign = [e.rel for e in storage.list_files(dest, s3)
               if e.rel.split("/", 1)[0] not in INGEST_OUTPUTS
               and not (source_rel and (e.rel == source_rel or e.rel.startswith(source_rel + "/")))]
    if foreign:
        raise DataInputError(f"dest={dest} is not empty and holds no ingest output ({len(foreign)} other files, "
                             f"e.g. {foreign[0]}): choose a new or empty folder")
