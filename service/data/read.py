"""One read task: a run of a lane's shares -> one batch dict per share.

The same function runs inside a Ray Data task (`pipeline.lane_dataset`) and
in a plain process (`pipeline.iter_lane_local`), so both give the same rows,
in the same order, with the same bytes and pixels.

Columns of every share (n = share rows):
  label     int64 [n]
  resize, box  int32 [n, 2], [n, 4]: where the image is cut (`service.data.params`)
  flip      bool [n]        mirror the crop on the device (training)
  lighting  float32 [n, 3]  PCA lighting offset, 0-255 units (zeros: val, rrc)
  bad_shard int32 [n]       -1, or with skip_bad_shards the index of the
                            unreadable shard whose row this one stands in for
  decode="cpu":    image uint8 [n, S, S, 3] (val 10-crop: [n, crops, S, S, 3]),
                   cropped here, not flipped
  decode="device": jpeg (the stored bytes); the tower decodes and cuts. The
                   share travels as a pyarrow Table (`share_arrays` gives
                   the dict: jpeg a list of uint8 views)
  with_keys:       key str [n] (tests, benchmarks; never on the training path)

Each image's crop, flip and lighting come from `service.data.params`: a
pure function of (seed, epoch, key), never of Ray's execution state, share
boundaries or task count.
"""

from __future__ import annotations

import sys
from typing import Iterator

import numpy as np

from service.data import storage
from service.data.decode import DECODE_ERRORS, CpuDecoder, jpeg_size
from service.data.epochs import (DataSource, Lane, ReadUnit, ShareUnit, sequence_units, shard_row_order,
                                 share_units, unit_rows)
from service.data.params import row_params, share_params

READ_COLUMNS = ["key", "jpeg", "label"]
# How many other shards a task tries in place of an unreadable one (skip mode).
MAX_STAND_INS = 3


class BadShardError(RuntimeError):
    """A shard that is missing, truncated, or holds an image that does not decode."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"bad shard {uri}: {reason} (set data.skip_bad_shards=true to skip bad shards, "
                         "or re-ingest the dataset)")
        self.uri, self.reason = uri, reason

    def __reduce__(self):  # keeps (uri, reason) across Ray's pickling
        return (BadShardError, (self.uri, self.reason))


def read_shard(source: DataSource, split: str, shard: int, columns: list[str]):
    """The shard as a pyarrow Table; `BadShardError` naming it when it cannot be read
    or holds another row count than meta.json says."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = source.shard_uri(split, shard)
    fs, path = storage.arrow_filesystem(uri, source.s3)
    # One thread: a read task holds one CPU, and Arrow's decoding thread pool only adds
    # CPU here (measured on a 500-image shard: 0.082 ms/image of process CPU with it,
    # 0.016 without). Reads from S3 still overlap on Arrow's separate I/O pool.
    try:
        table = storage.with_retries(lambda: pq.read_table(path, filesystem=fs, columns=columns, use_threads=False),
                                     source.s3.max_attempts)
    except (OSError, pa.ArrowException) as err:
        raise BadShardError(uri, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    expected = int(source.meta.shard_rows[split][shard])
    if table.num_rows != expected:
        raise BadShardError(uri, f"it has {table.num_rows} rows, meta.json says {expected}")
    return table


def _read_slice(source: DataSource, unit: ReadUnit, columns: list[str]):
    """(table of the unit's rows in plan order, bad_shard marks, URI of the shard read). With
    skip_bad_shards, an unreadable shard's rows are replaced by as many rows
    of the next readable shard of the split (its own epoch order, cycled),
    marked with the bad shard's index, so every lane keeps its row count
    and replicas stay in step."""
    wanted, first_error = unit.stop - unit.start, None
    count = len(source.meta.shards[unit.split])
    for step in range(min(MAX_STAND_INS, count - 1) + 1 if source.skip_bad_shards else 1):
        shard = (unit.shard + step) % count
        if step == 0:
            rows = unit_rows(source, unit)
        else:
            order = shard_row_order(source, unit.split, unit.epoch, shard)
            rows = order[np.arange(wanted) % len(order)]
        try:
            table = read_shard(source, unit.split, shard, columns).take(rows)
            marks = np.full(wanted, -1 if step == 0 else unit.shard, np.int32)
            return table, marks, source.shard_uri(unit.split, shard)
        except BadShardError as err:
            if not source.skip_bad_shards:
                raise
            first_error = first_error or err
            print(f"[data] WARNING: skipping {err}", file=sys.stderr, flush=True)
    raise BadShardError(source.shard_uri(unit.split, unit.shard),
                        f"{first_error.reason if first_error else 'unreadable'}; and none of the next "
                        f"{MAX_STAND_INS} shards could stand in for it")


def read_rows(source: DataSource, split: str, epoch: int, start: int, stop: int, columns: list[str]):
    """Rows [start, stop) of the epoch sequence: (table in plan order, bad_shard marks, per-row shard URI)."""
    import pyarrow as pa

    tables, marks, uris = [], [], []
    for unit in sequence_units(source, split, epoch, start, stop):
        table, mark, uri = _read_slice(source, unit, columns)
        tables.append(table)
        marks.append(mark)
        uris += [uri] * len(mark)
    return pa.concat_tables(tables), np.concatenate(marks), uris


def lane_keys(source: DataSource, split: str, epoch: int, lane: Lane, share_rows: int = 1,
              skip_shares: int = 0) -> list[str]:
    """The image keys the lane reads in epoch `epoch`, in order (reads only the `key` column)."""
    keys: list[str] = []
    for unit in share_units(source, split, epoch, lane, share_rows, skip_shares):
        table, _, _ = read_rows(source, split, epoch, *unit.rows(), ["key"])
        keys += table.column("key").to_pylist()
    return keys


def read_shares(source: DataSource, unit: ShareUnit, with_keys: bool = False) -> Iterator:
    """Read the unit's rows (each shard once) and yield one share per `unit.share_rows` rows:
    cpu mode a dict of numpy columns (decoded crops), device mode a pyarrow Table (JPEG bytes
    as read, no copy into Python objects; `share_arrays` turns it into the same dict form)."""
    start, stop = unit.rows()
    table, marks, uris = read_rows(source, unit.split, unit.epoch, start, stop, READ_COLUMNS)
    keys = table.column("key").to_pylist()
    labels = table.column("label").to_numpy().astype(np.int64)
    jpegs = table.column("jpeg").combine_chunks()
    decoder = CpuDecoder() if source.decode == "cpu" else None
    for lo in range(0, len(keys), unit.share_rows):
        hi = min(lo + unit.share_rows, len(keys))
        part = jpegs.slice(lo, hi - lo)
        share = _share(source, unit, binary_views(part), keys[lo:hi], uris[lo:hi], decoder)
        share.update(label=labels[lo:hi], bad_shard=marks[lo:hi])
        if with_keys:
            share["key"] = np.array(keys[lo:hi], dtype=object)
        yield share if decoder else _share_table(share, part)


def _share(source: DataSource, unit: ShareUnit, jpegs: list[np.ndarray], keys: list[str], uris: list[str],
           decoder) -> dict[str, np.ndarray]:
    """Parameters (and, in cpu mode, the decoded crops) of one share's rows."""
    n, size, train = len(keys), source.image_size, unit.split == "train"
    sizes = np.empty((n, 2), np.int64)
    for row, jpeg in enumerate(jpegs):
        try:
            sizes[row] = jpeg_size(jpeg)
        except DECODE_ERRORS as err:
            raise _bad_image(uris[row], keys[row], err) from err
    params = share_params(source, unit.split, unit.epoch, keys, sizes[:, 0], sizes[:, 1])
    if not decoder:
        return params
    crops = () if train or source.eval_crop_count == 1 else (source.eval_crop_count,)
    images = np.empty((n, *crops, size, size, 3), np.uint8)
    for row, jpeg in enumerate(jpegs):
        try:
            if train:
                decoder.train_crop(jpeg, row_params(params, row), size, source.augmentation, images[row])
            else:
                decoder.eval_crops(jpeg, row_params(params, row), size, source.eval_crops, source.hflip, images[row])
        except DECODE_ERRORS as err:
            raise _bad_image(uris[row], keys[row], err) from err
    return {"image": images, **params}


def _bad_image(uri: str, key: str, err: Exception) -> BadShardError:
    return BadShardError(uri, f"image {key} does not decode ({type(err).__name__}: {err})")


def binary_views(array) -> list[np.ndarray]:
    """The values of a pyarrow binary array as uint8 numpy views of its data buffer (no copy;
    each view keeps the buffer alive). Both decoders take them as they take bytes."""
    import pyarrow as pa

    width = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], width)[array.offset:array.offset + len(array) + 1]
    data = array.buffers()[2]
    values = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(array))]


def _share_table(share: dict[str, np.ndarray], jpegs):
    """A device-mode share as a pyarrow Table: the JPEG column as read, the [n, k] parameter
    columns as fixed-size lists (plain Arrow, so Ray Data stores and returns them without its
    tensor extension's conversions)."""
    import pyarrow as pa

    columns = {"jpeg": jpegs}
    for name, value in share.items():
        if name == "key":
            columns[name] = pa.array(list(value), pa.string())
        elif value.ndim == 2:
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(value.ravel()), value.shape[1])
        else:
            columns[name] = pa.array(value)
    return pa.table(columns)


def share_arrays(table) -> dict:
    """A device-mode share (pyarrow Table, as `read_shares` yields it) as numpy columns: `jpeg`
    a list of uint8 views (`binary_views`), [n, k] parameters as 2-D arrays, `key` an object
    array; no column is copied except the flip bits."""
    import pyarrow as pa

    out: dict = {}
    for name in table.column_names:
        column = table.column(name)
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        if name == "jpeg":
            out[name] = binary_views(column)
        elif pa.types.is_fixed_size_list(column.type):
            out[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def skipped_shards(batch: dict[str, np.ndarray], source: DataSource, split: str) -> set[str]:
    """URIs of the unreadable shards that rows of `batch` stand in for (skip mode)."""
    marks = np.asarray(batch["bad_shard"])
    return {source.shard_uri(split, int(index)) for index in np.unique(marks[marks >= 0])}
