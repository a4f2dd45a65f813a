"""The epoch plan: which images a replica sees in an epoch, in which order.

A pure function of the dataset's meta.json and (seed, epoch, replica,
replicas): no Ray, no reads, no decoding. So a resumed run replays exactly
the order of an uninterrupted one, whatever Ray Data did before.

Training epoch `e`: the train shards in a seeded order, each shard's rows in
a seeded permutation (both from (seed, e)), concatenated into one sequence
of N rows. Replica r of R takes the contiguous part [r*n, (r+1)*n) with
n = N // R, so every replica runs the same number of steps, replicas are
disjoint, and at most R-1 rows (different ones each epoch) are left out.
Contiguous parts keep I/O low: a replica reads about 1/R of the shards.
Ingest scattered classes randomly over shards, so a shard-level order plus
an in-shard permutation mixes classes without an all-to-all shuffle.

Validation: the val shards and rows in stored order, split into R parts
whose sizes differ by at most one, so every image is evaluated exactly once.

Towers: replica r's part is cut into T contiguous lanes, one per tower
(`Lane`). Tower t reads only its lane; replica r's batch k is the
concatenation, in tower order, of every lane's share k (B/T rows each), so
no process reads or decodes its replica's whole input, each shard slice is
read by one tower only, and the towers all-gather the shares into the same
full batch. With T = 1 the lane is the replica's part.

Resume skips whole shares before anything is read. The plan is a list of
`ReadUnit`s (a slice of one shard's epoch row order); `ShareUnit`s group a
run of a lane's shares, the unit of work of one read task.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from service.data import storage
from service.data.checks import check_data_root
from service.data.meta import DatasetMeta
from service.data.options import AUGMENTATIONS, EVAL_CROPS, RESOLVED_DECODE_MODES

SPLITS = ("train", "val")
_SHARD_ORDER, _ROW_ORDER, _IMAGE = 0, 1, 2  # stream tags: independent random streams
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class DataSource:
    """Everything a worker needs to produce batches; plain picklable data.

    Built on the driver by `open_source`; the S3 keys are resolved there and
    travel with it (the repr shows no secret).
    """

    root: str
    s3: storage.S3Settings
    meta: DatasetMeta
    # -- Crop side; shards are decoded at `resize_size` and cropped to it.
    image_size: int
    resize_size: int
    augmentation: str
    hflip: bool
    pca_lighting_std: float
    # -- 1 or 10 (see `eval_crop_count` for what reaches the trainer).
    eval_crops: int
    # -- data.shuffle_seed: the shuffle and every augmentation derive from it.
    seed: int
    skip_bad_shards: bool
    # -- Where images are decoded: "cpu" (Ray Data tasks ship cropped pixels)
    #    or "device" (tasks ship JPEG bytes, the tower decodes); never "auto" here.
    decode: str = "cpu"

    def __repr__(self) -> str:
        return (f"DataSource(root={self.root!r}, train={self.meta.num_train} images in "
                f"{len(self.meta.shards['train'])} shards, val={self.meta.num_val}, image_size={self.image_size}, "
                f"augmentation={self.augmentation!r}, hflip={self.hflip}, eval_crops={self.eval_crops}, "
                f"seed={self.seed}, decode={self.decode!r}, s3={self.s3!r})")

    @property
    def eval_crop_count(self) -> int:
        """Crops per validation image: 1, 10 (5 + mirrored), or 5 with hflip off."""
        if self.eval_crops == 1:
            return 1
        return 10 if self.hflip else 5

    def shard_uri(self, split: str, shard: int) -> str:
        """The URI of shard number `shard` of `split` (meta.json order)."""
        return storage.join(self.root, self.meta.shards[split][shard])

    def num_rows(self, split: str) -> int:
        """Images in `split`."""
        return int(sum(self.meta.shard_rows[split]))


@dataclass(frozen=True)
class ReadUnit:
    """Rows [start, stop) of shard `shard`'s row order in epoch `epoch` (one decode task)."""

    split: str
    epoch: int
    shard: int
    start: int
    stop: int


def open_source(data_cfg: Any, image_size: int, num_replicas: int, decode: str = "cpu") -> DataSource:
    """Driver side: check the settings and load meta.json (clear errors), resolve S3 keys.

    `data_cfg` is `service.config.DataConfig` (root, augmentation, hflip,
    pca_lighting_std, eval_crops, resize_size, shuffle_seed, skip_bad_shards,
    s3_*); `decode` the resolved data.decode ("cpu" or "device").
    """
    if decode not in RESOLVED_DECODE_MODES:
        raise ValueError(f"decode={decode!r}; choose one of {list(RESOLVED_DECODE_MODES)}")
    if data_cfg.augmentation not in AUGMENTATIONS:
        raise ValueError(f"data.augmentation={data_cfg.augmentation!r}; choose one of {list(AUGMENTATIONS)}")
    if data_cfg.eval_crops not in EVAL_CROPS:
        raise ValueError(f"data.eval_crops={data_cfg.eval_crops!r}; choose one of {list(EVAL_CROPS)}")
    if image_size > data_cfg.resize_size:
        raise ValueError(f"image_size={image_size} is larger than data.resize_size={data_cfg.resize_size}")
    if num_replicas < 1:
        raise ValueError(f"num_replicas={num_replicas} must be >= 1")
    s3 = storage.S3Settings.from_fields(data_cfg).resolved()
    meta = check_data_root(data_cfg.root, s3)
    for split in SPLITS:
        if len(meta.shards[split]) != len(meta.shard_rows[split]):
            raise ValueError(f"{data_cfg.root}/meta.json lists {len(meta.shards[split])} {split} shards but "
                             f"{len(meta.shard_rows[split])} row counts; re-ingest the dataset")
    if meta.num_train < num_replicas:
        raise ValueError(f"{meta.num_train} training images cannot be split over {num_replicas} replicas")
    if meta.resize_size < data_cfg.resize_size:
        raise ValueError(f"shards at {data_cfg.root} are stored at shorter side {meta.resize_size}, smaller than "
                         f"data.resize_size={data_cfg.resize_size}; re-ingest with resize_size="
                         f"{data_cfg.resize_size} or lower data.resize_size")
    return DataSource(root=data_cfg.root, s3=s3, meta=meta, image_size=image_size,
                      resize_size=data_cfg.resize_size, augmentation=data_cfg.augmentation, hflip=data_cfg.hflip,
                      pca_lighting_std=data_cfg.pca_lighting_std, eval_crops=data_cfg.eval_crops,
                      seed=data_cfg.shuffle_seed, skip_bad_shards=data_cfg.skip_bad_shards, decode=decode)


def random_stream(*words: int) -> np.random.Generator:
    """A random generator seeded by non-negative integer words (seed, epoch, tag, ...)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([w & _MASK64 for w in words])))


def key_word(key: str) -> int:
    """A 64-bit integer from an image key (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def image_stream(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The augmentation randomness of one image in one epoch: a pure function of (seed, epoch, key).
    Used where the number of draws varies (RandomResizedCrop's rejection loop); the paper's
    augmentation draws a fixed number per image and uses `image_uniforms`."""
    return random_stream(seed, epoch, _IMAGE, key_word(key))


IMAGE_UNIFORMS = 8  # uniforms per image from one 64-byte digest


def image_uniforms(seed: int, epoch: int, keys: Sequence[str]) -> np.ndarray:
    """float64 [n, IMAGE_UNIFORMS] in [0, 1): each image's augmentation randomness in epoch
    `epoch`, a pure function of (seed, epoch, key) like `image_stream`, for a whole share at once.

    One BLAKE2b digest per image (hashlib; keyed through its `person` field by seed and epoch)
    gives 8 independent 64-bit words, each mapped to a 53-bit float. A numpy Generator per
    image (`image_stream`: a SeedSequence, a PCG64) costs ~35 us; this ~1.5 us, and the rest
    of the draw is vectorised over the share (bench/input_pipeline.py: the per-image Generator
    was half of a device-mode read task's CPU).
    """
    person, salt = struct.pack("<QQ", seed & _MASK64, epoch & _MASK64), _IMAGE.to_bytes(8, "little")
    digests = b"".join(hashlib.blake2b(key.encode("utf-8"), digest_size=8 * IMAGE_UNIFORMS, person=person,
                                       salt=salt).digest() for key in keys)
    words = np.frombuffer(digests, dtype="<u8").reshape(len(keys), IMAGE_UNIFORMS)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def shard_order(source: DataSource, split: str, epoch: int) -> np.ndarray:
    """Shard indices in the order epoch `epoch` reads them."""
    count = len(source.meta.shards[split])
    if split == "val":
        return np.arange(count)
    return random_stream(source.seed, epoch, _SHARD_ORDER).permutation(count)


def shard_row_order(source: DataSource, split: str, epoch: int, shard: int) -> np.ndarray:
    """Row indices of one shard in the order epoch `epoch` reads them."""
    rows = int(source.meta.shard_rows[split][shard])
    if split == "val":
        return np.arange(rows)
    return random_stream(source.seed, epoch, _ROW_ORDER, shard).permutation(rows)


@dataclass(frozen=True)
class Lane:
    """The part of an epoch one tower reads: tower `tower` of replica `replica`."""

    replica: int
    replicas: int
    tower: int = 0
    towers: int = 1

    def __post_init__(self):
        if self.replicas < 1 or not 0 <= self.replica < self.replicas:
            raise ValueError(f"replica={self.replica} must be in [0, replicas={self.replicas})")
        if self.towers < 1 or not 0 <= self.tower < self.towers:
            raise ValueError(f"tower={self.tower} must be in [0, towers={self.towers})")


@dataclass(frozen=True)
class ShareUnit:
    """Shares [first, first + count) of a lane in epoch `epoch` (one read task);
    share i holds the lane's rows [i * share_rows, (i + 1) * share_rows)."""

    split: str
    epoch: int
    lane_start: int
    lane_stop: int
    share_rows: int
    first: int
    count: int

    def rows(self) -> tuple[int, int]:
        """[start, stop) of the epoch sequence this unit reads."""
        start = self.lane_start + self.first * self.share_rows
        return start, min(self.lane_stop, start + self.count * self.share_rows)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {list(SPLITS)}")


def _even_part(start: int, stop: int, index: int, parts: int) -> tuple[int, int]:
    """Part `index` of [start, stop) cut into `parts` pieces whose sizes differ by at most one."""
    per, extra = divmod(stop - start, parts)
    first = start + index * per + min(index, extra)
    return first, first + per + (1 if index < extra else 0)


def replica_range(source: DataSource, split: str, replica: int, replicas: int) -> tuple[int, int]:
    """[start, stop) of replica `replica`'s part of the epoch sequence."""
    _check_split(split)
    Lane(replica, replicas)
    total = source.num_rows(split)
    if split == "train":
        per = total // replicas
        return replica * per, (replica + 1) * per
    return _even_part(0, total, replica, replicas)


def lane_range(source: DataSource, split: str, lane: Lane) -> tuple[int, int]:
    """[start, stop) of the lane's part of the epoch sequence: train lanes are
    equal (N // R // T rows), val lanes cover the replica's part exactly."""
    start, stop = replica_range(source, split, lane.replica, lane.replicas)
    if split == "train":
        per = (stop - start) // lane.towers
        return start + lane.tower * per, start + (lane.tower + 1) * per
    return _even_part(start, stop, lane.tower, lane.towers)


def replica_rows(source: DataSource, split: str, replica: int, replicas: int) -> int:
    """Rows replica `replica` gets per epoch: train N // replicas for every
    replica; val the exact split of all N (sizes differ by at most one)."""
    start, stop = replica_range(source, split, replica, replicas)
    return stop - start


def steps_per_epoch(source: DataSource, replicas: int, towers: int, replica_batch: int) -> int:
    """Training steps per epoch: every lane gives whole shares of replica_batch / towers rows."""
    if replica_batch % towers:
        raise ValueError(f"the per-replica batch {replica_batch} does not divide over {towers} towers")
    start, stop = lane_range(source, "train", Lane(0, replicas, 0, towers))
    return (stop - start) // (replica_batch // towers)


def lane_shares(source: DataSource, split: str, lane: Lane, share_rows: int) -> int:
    """Shares the lane yields in an epoch: whole ones only in training, every row in val."""
    start, stop = lane_range(source, split, lane)
    return (stop - start) // share_rows if split == "train" else -(-(stop - start) // share_rows)


def share_units(source: DataSource, split: str, epoch: int, lane: Lane, share_rows: int,
                skip_shares: int = 0, shares_per_unit: int = 0) -> list[ShareUnit]:
    """The lane's shares of epoch `epoch` after the first `skip_shares`, as read
    tasks of `shares_per_unit` shares each (0: all in one)."""
    if share_rows < 1:
        raise ValueError(f"share_rows={share_rows} must be >= 1")
    start, stop = lane_range(source, split, lane)
    total = lane_shares(source, split, lane, share_rows)
    if not 0 <= skip_shares <= total:
        raise ValueError(f"skip_shares={skip_shares} must be in [0, {total}] (shares of this lane)")
    step = shares_per_unit or max(1, total - skip_shares)
    return [ShareUnit(split, epoch, start, stop, share_rows, first, min(step, total - first))
            for first in range(skip_shares, total, step)]


def sequence_units(source: DataSource, split: str, epoch: int, start: int, stop: int) -> list[ReadUnit]:
    """Rows [start, stop) of epoch `epoch`'s sequence as shard slices, in order."""
    _check_split(split)
    order = shard_order(source, split, epoch)
    # Offsets by cumulative sum and a binary search for the first shard: each read task of a
    # full-size ImageNet epoch (1,000 shards) would otherwise walk ~500 shards in Python to
    # find its own one or two (bench/plan_scale.py, 8x8 lanes: 1.2 -> 0.36 CPU-s per epoch).
    ends = np.cumsum(np.asarray(source.meta.shard_rows[split], dtype=np.int64)[order])
    units = []
    for index in range(int(np.searchsorted(ends, start, side="right")), len(order)):
        offset = int(ends[index - 1]) if index else 0
        if offset >= stop:
            break
        lo, hi = max(start, offset) - offset, min(stop, int(ends[index])) - offset
        if lo < hi:
            units.append(ReadUnit(split, epoch, int(order[index]), lo, hi))
    return units


def unit_rows(source: DataSource, unit: ReadUnit) -> np.ndarray:
    """The shard row indices a unit reads, in order."""
    return shard_row_order(source, unit.split, unit.epoch, unit.shard)[unit.start:unit.stop]
