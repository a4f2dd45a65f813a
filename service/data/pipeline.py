"""The training input pipeline: Parquet shards -> decoded, augmented uint8 batches.

`build_pipeline` runs on the driver and returns two lazy Ray Datasets:

    from_items(shard paths listed in meta.json)
      -> train: randomize_block_order (a new seeded shard order every epoch)
      -> map_batches(ReadShard): read one shard, permute its rows (0-CPU I/O tasks)
      -> map_batches(decode + crop + flip [+ PCA lighting]) on `num_decode_actors`
         concurrent CPU tasks (or actors, `decode_with="actors"`)
      -> rows {image: uint8 [S,S,3] (val 10-crop: [10,S,S,3]), label: int64, lighting: float32 [3]}

Shuffling, cheap on two cores and exact over an epoch: ingest already
scattered classes randomly over shards; each epoch (each execution of the
dataset) reads the shards in a new order (`RandomSeedConfig(shuffle_seed,
reseed_after_execution=True)`) and permutes the rows of each shard, so every
image is read exactly once per epoch and consecutive batches mix all classes.
No all-to-all shuffle. The shard order, the row permutation and each image's
crop/flip/lighting are seeded from (shuffle_seed, epoch, shard/content), so a
run replays exactly for a seed; the "epoch" is Ray Data's execution counter.

Decoding runs as Ray tasks by default: tasks reuse Ray's pooled worker
processes across epochs, while an actor pool is started afresh every epoch
(measured on 2 cores: first batch after ~1 s with tasks, ~4 s with actors).

Replicas: `split_for_replicas` (or `train.streaming_split(n, equal=True)`)
hands each replica a disjoint stream; `equal=True` drops at most n-1 rows per
epoch so every replica takes the same number of steps.

Normalisation is NOT done here: batches cross the wire as uint8 and the
training step casts on the device, adds `lighting` (0-255 units), subtracts
`meta.mean` and divides by `meta.std` (both 0-255 units).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

from service.data import storage, transforms
from service.data.meta import DatasetMeta, load_meta
from service.data.options import AUGMENTATIONS



@dataclass
class TrainingData:
    """What the trainer gets: the dataset description and two lazy Ray Datasets."""

    meta: DatasetMeta
    # -- rows: image uint8 [S, S, 3], label int64, lighting float32 [3] (0-255 units).
    train: Any  # ray.data.Dataset
    # -- rows: image uint8 [S, S, 3] or [10, S, S, 3], label int64, lighting zeros.
    val: Any  # ray.data.Dataset


def _output(batch: dict[str, np.ndarray], images: np.ndarray, lighting: np.ndarray) -> dict[str, np.ndarray]:
    out = {"image": images, "label": batch["label"].astype(np.int64), "lighting": lighting}
    if "key" in batch:  # only with build_pipeline(include_keys=True)
        out["key"] = batch["key"]
    return out


def execution_index() -> int:
    """Which execution (epoch) of the dataset this task belongs to; 0 when unknown.

    Ray Data copies the driver's DataContext, with its execution counter, into
    every task and actor of an execution; the counter is private API, hence
    the fallback.
    """
    try:
        from ray.data import DataContext

        return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)
    except Exception:  # noqa: BLE001 - outside Ray (unit tests) there is no context
        return 0


def image_rng(seed: int, epoch: int, jpeg: bytes) -> np.random.Generator:
    """The random stream of one image in one epoch: a pure function of (seed, epoch, bytes)."""
    return np.random.Generator(np.random.PCG64([seed, epoch, zlib.crc32(jpeg)]))


class TrainTransform:
    """Decode + paper (crop, flip, PCA lighting) or rrc (RandomResizedCrop, flip) augmentation.

    Each image draws its crop, flip and lighting from `image_rng(seed, epoch,
    bytes)`, so augmentation replays exactly for a seed whatever the actor
    count or batch boundaries, and differs between epochs.
    """

    def __init__(self, image_size: int, resize_size: int, augmentation: str, pca_lighting_std: float,
                 eigval: list[float], eigvec: list[list[float]], seed: int = 0):
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation={augmentation!r}; choose one of {AUGMENTATIONS}")
        if image_size > resize_size:
            raise ValueError(f"image_size={image_size} is larger than resize_size={resize_size}")
        self.image_size, self.resize_size, self.augmentation = image_size, resize_size, augmentation
        self.pca_lighting_std, self.eigval, self.eigvec = pca_lighting_std, eigval, eigvec
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jpegs, n, size = batch["jpeg"], len(batch["jpeg"]), self.image_size
        images = np.empty((n, size, size, 3), np.uint8)
        lighting = np.zeros((n, 3), np.float32)
        epoch = execution_index()
        for i in range(n):
            rng = image_rng(self.seed, epoch, jpegs[i])
            if self.augmentation == "paper":
                img = transforms.decode_short_side(jpegs[i], self.resize_size)
                left, top, _right, _bottom = transforms.center_square_box(*img.size)
                side = min(img.size)
                dy, dx = transforms.random_crop_bounds(rng, side, side, size)
                patch = img.crop((left + dx, top + dy, left + dx + size, top + dy + size))
            else:
                width, height = transforms.stored_size(jpegs[i])
                box = transforms.random_resized_crop_box(rng, height, width)
                patch = transforms.resized_crop_image(jpegs[i], box, (width, height), size)
            if rng.random() < 0.5:  # PIL's C mirror: a reversed-stride numpy copy costs 10x more
                patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            images[i] = np.asarray(patch)
            if self.augmentation == "paper" and self.pca_lighting_std > 0:
                lighting[i] = 255.0 * transforms.pca_lighting_offset(
                    rng, self.eigval, self.eigvec, self.pca_lighting_std, 1)[0]
        return _output(batch, images, lighting)


class EvalTransform:
    """Decode + centre crop of the central square, or the paper's 10 crops."""

    def __init__(self, image_size: int, resize_size: int, eval_crops: int):
        if eval_crops not in (1, 10):
            raise ValueError(f"eval_crops={eval_crops}; choose 1 or 10")
        self.image_size, self.resize_size, self.eval_crops = image_size, resize_size, eval_crops

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jpegs, n, size = batch["jpeg"], len(batch["jpeg"]), self.image_size
        shape = (n, size, size, 3) if self.eval_crops == 1 else (n, 10, size, size, 3)
        images = np.empty(shape, np.uint8)
        for i in range(n):
            img = transforms.decode_short_side(jpegs[i], self.resize_size)
            square = np.asarray(img.crop(transforms.center_square_box(*img.size)))
            if self.eval_crops == 1:
                top, left = transforms.center_crop_bounds(*square.shape[:2], size)
                images[i] = transforms.crop(square, top, left, size)
            else:
                images[i] = transforms.ten_crop(square, size)
        return _output(batch, images, np.zeros((n, 3), np.float32))


class ReadShard:
    """Read one Parquet shard (one row per image) and, for training, permute its rows.

    The permutation is seeded from (seed, epoch, shard path): replayable, new each epoch.
    """

    def __init__(self, filesystem: Any, columns: list[str], shuffle_seed: Optional[int]):
        self.filesystem, self.columns, self.shuffle_seed = filesystem, columns, shuffle_seed

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for path in batch["path"]:
            table = pq.read_table(str(path), filesystem=self.filesystem, columns=self.columns)
            if self.shuffle_seed is not None and table.num_rows > 1:
                seed = [self.shuffle_seed, execution_index(), zlib.crc32(str(path).encode())]
                table = table.take(np.random.Generator(np.random.PCG64(seed)).permutation(table.num_rows))
            tables.append(table)
        return pa.concat_tables(tables)


def _read_shards(meta: DatasetMeta, root: str, split: str, s3: storage.S3Settings, shuffle_seed: Optional[int],
                 include_keys: bool, max_reads: int):
    """Shard paths -> (per-epoch shuffled) blocks of rows, one block per shard.

    Not `read_parquet`: its file listing runs as a 1-CPU task that can never
    be scheduled once decode actors or training workers hold every CPU (a
    deadlock seen on 2 cores), and meta.json already lists the files. Reads
    take 0 CPUs (I/O); `max_reads` bounds how many run at once (memory).
    """
    import ray.data
    from ray.data import RandomSeedConfig

    fs, base = storage.arrow_filesystem(root, s3)
    paths = [f"{base}/{rel}" for rel in meta.shards[split]]
    if not paths:
        raise ValueError(f"{root}: meta.json lists no {split} shards (num_{split}=0); nothing to read")
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    if shuffle_seed is not None:
        # A new, seeded shard order per execution (= epoch).
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
    columns = ["jpeg", "label"] + (["key"] if include_keys else [])
    return ds.map_batches(ReadShard(fs, columns, shuffle_seed), batch_size=1, batch_format="numpy",
                          num_cpus=0, compute=ray.data.TaskPoolStrategy(size=min(max_reads, len(paths))))


def build_pipeline(data_cfg: Any, image_size: int, num_replicas: int, *,
                   decode_batch_size: int = 128, cpus_per_decode_actor: float = 1.0,
                   include_keys: bool = False, decode_with: str = "tasks") -> TrainingData:
    """Lazy train/val Ray Datasets over the shards at `data_cfg.root` (driver side).

    `data_cfg` is `service.config.DataConfig`; uses root, augmentation,
    pca_lighting_std, eval_crops, resize_size, num_decode_actors,
    shuffle_seed and the s3_* fields. `num_replicas` is checked against the
    dataset size (each replica must get at least one image per epoch).

    Keyword options: `decode_batch_size` rows per decode call,
    `cpus_per_decode_actor` (lower it when training workers hold every CPU),
    `include_keys` adds a string column `key` (the image id; tests, analysis),
    `decode_with` "tasks" (default: no per-epoch start-up) or "actors".
    """
    if decode_with not in ("tasks", "actors"):
        raise ValueError(f"decode_with={decode_with!r}; choose tasks or actors")
    if data_cfg.augmentation not in AUGMENTATIONS:
        raise ValueError(f"data.augmentation={data_cfg.augmentation!r}; choose one of {list(AUGMENTATIONS)}")
    if data_cfg.eval_crops not in (1, 10):
        raise ValueError(f"data.eval_crops={data_cfg.eval_crops!r}; choose 1 or 10")
    if image_size > data_cfg.resize_size:
        raise ValueError(f"image_size={image_size} is larger than data.resize_size={data_cfg.resize_size}")
    if num_replicas < 1:
        raise ValueError(f"num_replicas={num_replicas} must be >= 1")
    workers = max(1, data_cfg.decode_concurrency)
    if not data_cfg.root:
        raise ValueError("data.root is empty; ingest a dataset (or generate_demo_dataset) first")
    s3 = storage.S3Settings.from_data_config(data_cfg)
    meta = load_meta(data_cfg.root, s3)
    if meta.num_train < num_replicas:
        raise ValueError(f"{meta.num_train} training images cannot be split over {num_replicas} replicas")
    if meta.resize_size < data_cfg.resize_size:
        raise ValueError(f"shards at {data_cfg.root} are stored at shorter side {meta.resize_size}, "
                         f"smaller than data.resize_size={data_cfg.resize_size}; re-ingest with resize_size="
                         f"{data_cfg.resize_size} or lower data.resize_size")

    max_reads = max(2, workers)
    train_kwargs = {"image_size": image_size, "resize_size": data_cfg.resize_size,
                    "augmentation": data_cfg.augmentation, "pca_lighting_std": data_cfg.pca_lighting_std,
                    "eigval": meta.eigval, "eigvec": meta.eigvec, "seed": data_cfg.shuffle_seed}
    val_kwargs = {"image_size": image_size, "resize_size": data_cfg.resize_size, "eval_crops": data_cfg.eval_crops}
    train = _decode(_read_shards(meta, data_cfg.root, "train", s3, data_cfg.shuffle_seed, include_keys, max_reads),
                    TrainTransform, train_kwargs, workers, cpus_per_decode_actor,
                    decode_batch_size, decode_with)
    val = _decode(_read_shards(meta, data_cfg.root, "val", s3, None, include_keys, max_reads),
                  EvalTransform, val_kwargs, workers, cpus_per_decode_actor,
                  decode_batch_size, decode_with)
    return TrainingData(meta=meta, train=train, val=val)


def _apply_transform(batch: dict[str, np.ndarray], transform_cls: type, kwargs: dict) -> dict[str, np.ndarray]:
    return transform_cls(**kwargs)(batch)


def _decode(ds: Any, transform_cls: type, kwargs: dict, workers: int, num_cpus: float, batch_size: int,
            decode_with: str) -> Any:
    """map_batches(decode + augment) on `workers` CPU tasks or actors."""
    import ray.data

    common = {"num_cpus": num_cpus, "batch_size": batch_size, "batch_format": "numpy", "zero_copy_batch": True}
    if decode_with == "tasks":
        # Tasks run in Ray's pooled worker processes, which outlive an epoch: no
        # per-epoch actor start-up (seconds on 2 cores), same decode speed.
        return ds.map_batches(_apply_transform, fn_kwargs={"transform_cls": transform_cls, "kwargs": kwargs},
                              compute=ray.data.TaskPoolStrategy(size=workers), **common)
    # min_size=1: a cluster with fewer free CPUs than `workers` still runs (with
    # fewer actors) instead of waiting forever for the full pool.
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=workers, initial_size=workers)
    return ds.map_batches(transform_cls, fn_constructor_kwargs=kwargs, compute=pool, **common)


def split_for_replicas(ds: Any, num_replicas: int, equal: bool = True) -> list:
    """`num_replicas` disjoint DataIterators over `ds`, one per replica (consume them concurrently).

    equal=True: every replica gets the same number of rows (at most
    num_replicas - 1 rows per epoch are dropped). Use equal=False for exact
    validation over every image.
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas={num_replicas} must be >= 1")
    return ds.streaming_split(num_replicas, equal=equal)
