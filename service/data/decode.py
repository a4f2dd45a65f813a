"""One decode task: read a shard slice, decode and augment it, yield uint8 batches.

The same function runs inside a Ray Data task (`pipeline.epoch_dataset`)
and in a plain process (`pipeline.iter_epoch_local`), so both give the same
rows, in the same order, with the same pixels.

Output batch columns:
  image     uint8 [n, S, S, 3] (val with 10-crop evaluation: [n, crops, S, S, 3])
  label     int64 [n]
  lighting  float32 [n, 3]: PCA lighting offset in 0-255 units (zeros for val, rrc)
  key       str [n]: the image id (the `key` column of the shard)
  bad_shard int32 [n]: -1, or with skip_bad_shards the index of the unreadable
            shard whose row this one stands in for (see `decode_unit`)

Each image's crop, flip and lighting come from `image_stream(seed, epoch,
key)`: a pure function of the image and the epoch, never of Ray's execution
state, batch boundaries or task count.
"""

from __future__ import annotations

import sys
from typing import Iterator

import numpy as np
from PIL import Image

from service.data import storage, transforms
from service.data.epochs import DataSource, ReadUnit, image_stream, shard_row_order, unit_rows

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
    try:
        table = storage.with_retries(lambda: pq.read_table(path, filesystem=fs, columns=columns),
                                     source.s3.max_attempts)
    except (OSError, pa.ArrowException) as err:
        raise BadShardError(uri, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    expected = int(source.meta.shard_rows[split][shard])
    if table.num_rows != expected:
        raise BadShardError(uri, f"it has {table.num_rows} rows, meta.json says {expected}")
    return table


def train_image(source: DataSource, jpeg: bytes, key: str, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [S, S, 3], float32 [3] lighting) for one training image.

    Draw order per image: crop, flip coin, lighting. The coin is drawn even
    with hflip off, so turning flips off changes nothing else.
    """
    rng, size = image_stream(source.seed, epoch, key), source.image_size
    if source.augmentation == "paper":
        img = transforms.decode_short_side(jpeg, source.resize_size)
        left, top, _right, _bottom = transforms.center_square_box(*img.size)
        side = min(img.size)
        dy, dx = transforms.random_crop_bounds(rng, side, side, size)
        patch = img.crop((left + dx, top + dy, left + dx + size, top + dy + size))
    else:
        width, height = transforms.stored_size(jpeg)
        box = transforms.random_resized_crop_box(rng, height, width)
        patch = transforms.resized_crop_image(jpeg, box, (width, height), size)
    if rng.random() < 0.5 and source.hflip:  # PIL's C mirror: a reversed-stride numpy copy costs 10x more
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    lighting = np.zeros(3, np.float32)
    if source.augmentation == "paper" and source.pca_lighting_std > 0:
        lighting[:] = 255.0 * transforms.pca_lighting_offset(
            rng, source.meta.eigval, source.meta.eigvec, source.pca_lighting_std, 1)[0]
    return np.asarray(patch), lighting


def eval_image(source: DataSource, jpeg: bytes) -> np.ndarray:
    """Centre crop [S, S, 3] of the central square, or its 10 (5 with hflip off) crops."""
    img = transforms.decode_short_side(jpeg, source.resize_size)
    crops = transforms.eval_crops(img, source.image_size, source.eval_crops, mirrored=source.hflip)
    return crops[0] if source.eval_crops == 1 else crops


def _decode_rows(source: DataSource, split: str, epoch: int, table, uri: str, bad_shard: int,
                 batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
    keys, jpegs = table.column("key").to_pylist(), table.column("jpeg")
    labels = table.column("label").to_numpy().astype(np.int64)
    size = source.image_size
    crops = () if split == "train" or source.eval_crop_count == 1 else (source.eval_crop_count,)
    for start in range(0, len(keys), batch_rows):
        stop = min(start + batch_rows, len(keys))
        images = np.empty((stop - start, *crops, size, size, 3), np.uint8)
        lighting = np.zeros((stop - start, 3), np.float32)
        for i in range(start, stop):
            jpeg = jpegs[i].as_py()
            try:
                if split == "train":
                    images[i - start], lighting[i - start] = train_image(source, jpeg, keys[i], epoch)
                else:
                    images[i - start] = eval_image(source, jpeg)
            except (OSError, EOFError, SyntaxError) as err:  # PIL's errors for corrupt JPEG data
                raise BadShardError(uri, f"image {keys[i]} does not decode ({type(err).__name__}: {err})") from err
        yield {"image": images, "label": labels[start:stop], "lighting": lighting,
               "key": np.array(keys[start:stop], dtype=object),
               "bad_shard": np.full(stop - start, bad_shard, np.int32)}


def decode_unit(source: DataSource, unit: ReadUnit, batch_rows: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Read one shard slice and yield decoded batches of up to `batch_rows` rows.

    An unreadable shard (or an image in it that does not decode) raises
    `BadShardError` naming the shard. With `skip_bad_shards`, the rows not
    yet produced are replaced by as many rows of the next readable shard of
    the split (in that shard's epoch order, cycling), marked with `bad_shard`
    = the bad shard's index: every replica still gets exactly its row count,
    so replicas stay in step, and the consumer counts the skipped shards.
    """
    wanted, done, first_error = unit.stop - unit.start, 0, None
    count = len(source.meta.shards[unit.split])
    for step in range(min(MAX_STAND_INS, count - 1) + 1 if source.skip_bad_shards else 1):
        shard = (unit.shard + step) % count
        if step == 0:
            rows = unit_rows(source, unit)
        else:  # a stand-in: its own epoch order, cycled to the length still missing
            order = shard_row_order(source, unit.split, unit.epoch, shard)
            rows = order[np.arange(wanted - done) % len(order)]
        try:
            table = read_shard(source, unit.split, shard, READ_COLUMNS).take(rows)
            for batch in _decode_rows(source, unit.split, unit.epoch, table, source.shard_uri(unit.split, shard),
                                      -1 if step == 0 else unit.shard, batch_rows):
                done += len(batch["label"])
                yield batch
            return
        except BadShardError as err:
            if not source.skip_bad_shards:
                raise
            first_error = first_error or err
            print(f"[data] WARNING: skipping {err}", file=sys.stderr, flush=True)
    raise BadShardError(source.shard_uri(unit.split, unit.shard),
                        f"{first_error.reason if first_error else 'unreadable'}; and none of the next "
                        f"{MAX_STAND_INS} shards could stand in for it")


def skipped_shards(batch: dict[str, np.ndarray], source: DataSource, split: str) -> set[str]:
    """URIs of the unreadable shards that rows of `batch` stand in for (skip mode)."""
    marks = np.asarray(batch["bad_shard"])
    return {source.shard_uri(split, int(index)) for index in np.unique(marks[marks >= 0])}
