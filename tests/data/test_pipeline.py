"""The Ray Data training pipeline: the batch contract and epoch coverage across replicas."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from service.config import DataConfig
from service.data.pipeline import build_pipeline, split_for_replicas
from service.data.ingest import IngestConfig, run_ingest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset_root(ray_local, synth_dataset, tmp_path_factory):
    raw, _manifest = synth_dataset("imagefolder")  # 4 classes x 6 train, x 3 val
    root = str(tmp_path_factory.mktemp("shards"))
    run_ingest(IngestConfig(source=raw, dest=root, resize_size=40, shard_size=5))
    return root


@pytest.mark.parametrize("augmentation, decode_with", [("paper", "tasks"), ("rrc", "actors")])
def test_train_batches_follow_the_contract(dataset_root, augmentation, decode_with):
    cfg = DataConfig(root=dataset_root, resize_size=40, augmentation=augmentation, decode_concurrency=2)
    data = build_pipeline(cfg, 32, 1, decode_with=decode_with)
    assert data.meta.num_classes == 4 and data.meta.num_train == 24 and len(data.meta.eigvec) == 3
    batch = data.train.take_batch(8, batch_format="numpy")
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int64 and set(batch["label"]) <= set(range(4))
    assert batch["lighting"].shape == (8, 3) and batch["lighting"].dtype == np.float32
    if augmentation == "paper":
        assert np.any(batch["lighting"] != 0) and np.all(np.abs(batch["lighting"]) < 40)
    else:
        assert not np.any(batch["lighting"])
    assert set(batch) == {"image", "label", "lighting"}


@pytest.mark.parametrize("eval_crops, shape", [(1, (32, 32, 3)), (10, (10, 32, 32, 3))])
def test_val_batches_follow_the_contract(dataset_root, eval_crops, shape):
    data = build_pipeline(DataConfig(root=dataset_root, resize_size=40, eval_crops=eval_crops), 32, 1)
    batch = data.val.take_batch(12, batch_format="numpy")
    assert batch["image"].shape == (12,) + shape and batch["image"].dtype == np.uint8
    assert not np.any(batch["lighting"]) and sorted(np.bincount(batch["label"])) == [3, 3, 3, 3]


def test_every_image_once_per_epoch_disjoint_across_replicas(dataset_root):
    data = build_pipeline(DataConfig(root=dataset_root, resize_size=40, shuffle_seed=5), 32, 2, include_keys=True)
    iterators = split_for_replicas(data.train, 2)
    epochs = 2
    seen: list[list[list[str]]] = [[], []]
    errors: list[BaseException] = []

    def consume(replica: int) -> None:
        try:
            for _ in range(epochs):
                keys = []
                for batch in iterators[replica].iter_batches(batch_size=4, batch_format="numpy"):
                    keys.extend(str(k) for k in batch["key"])
                seen[replica].append(keys)
        except BaseException as err:  # surfaced in the main thread
            errors.append(err)

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    for epoch in range(epochs):
        first, second = seen[0][epoch], seen[1][epoch]
        assert len(first) == len(second) == 12
        assert not set(first) & set(second), "replicas get disjoint images"
        assert len(set(first) | set(second)) == 24 == len(first) + len(second), "each image exactly once"
    orders = [seen[0][e] + seen[1][e] for e in range(epochs)]
    assert orders[0] != orders[1], "the order changes between epochs"
