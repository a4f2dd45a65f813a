"""Batch inference over the validation set with Ray Data.

The validation Dataset (decoded, cropped uint8 images and labels, from the
same pipeline training validates on) flows through `map_batches` into a pool
of actors, each holding the network once (the idiomatic Ray batch-inference
shape: the weights go through the object store once per actor, not once per
batch). Actors return, per image, the label, the top-5 class indices of the
crop-averaged softmax and its loss; the driver tallies them as they stream in,
so every image is counted exactly once (no split, no `drop_last`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Optional

import numpy as np

from service.data.meta import DatasetMeta
from service.evaluation.config import EvalOptions
from service.model import AlexNetSpec

TOP_K = 5


def validation_dataset(data_cfg, image_size: int) -> tuple[DatasetMeta, Any]:
    """(meta, validation Ray Dataset) from the data layer: the one place that knows how it is built.

    Rows: image uint8 [S, S, 3] (or [10, S, S, 3] with data.eval_crops=10), label int64.
    """
    from service.data.pipeline import build_pipeline

    data = build_pipeline(data_cfg, image_size, 1)
    return data.meta, data.val


def plan_resources(options: EvalOptions, data_cfg, cluster_cpus: float) -> tuple[int, Any]:
    """(model actors, data config with decode concurrency): actors take half
    the CPUs by default (at most 8), decoding the rest."""
    actors = options.actors or max(1, min(8, int(cluster_cpus // (2 * options.cpus_per_actor))))
    decode = data_cfg.decode_concurrency or max(1, int(cluster_cpus - actors * options.cpus_per_actor))
    return actors, replace(data_cfg, decode_concurrency=decode)


class ModelActor:
    """One replica of the network in a Ray actor: uint8 batches in, top-k out."""

    def __init__(self, spec_dict: dict, state: Any, mean: list[float], std: list[float], threads: int):
        import ray
        import torch

        from service.serving.classifier import build_network
        from service.train.checkpoint import spec_from_dict
        from service.train.step import Normalizer

        torch.set_num_threads(max(1, threads))
        if isinstance(state, ray.ObjectRef):
            state = ray.get(state)
        self.network = build_network(spec_from_dict(spec_dict), state)
        self.normalizer = Normalizer(mean, std, torch.device("cpu"), channels_last=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from service.serving.classifier import crop_probabilities

        images = torch.from_numpy(np.ascontiguousarray(batch["image"]))
        probs = crop_probabilities(self.network, self.normalizer, images)
        labels = torch.from_numpy(batch["label"].astype(np.int64))
        top = probs.topk(min(TOP_K, probs.shape[1]), dim=1).indices
        nll = -probs.gather(1, labels.view(-1, 1)).clamp_min(1e-12).log().view(-1)
        return {"label": labels.numpy(), "top": top.numpy(), "nll": nll.double().numpy()}


class Tally:
    """Running counts: confusion matrix of top-1 predictions, top-5 hits, loss."""

    def __init__(self, num_classes: int):
        self.confusion = np.zeros((num_classes, num_classes), np.int64)  # [true, predicted]
        self.top5_hits = 0
        self.nll_sum = 0.0

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    def add(self, labels: np.ndarray, top: np.ndarray, nll: np.ndarray) -> None:
        np.add.at(self.confusion, (labels, top[:, 0]), 1)
        self.top5_hits += int((top == labels[:, None]).any(axis=1).sum())
        self.nll_sum += float(nll.sum())


def run_inference(
    spec: AlexNetSpec,
    state: dict,
    mean: list[float],
    std: list[float],
    dataset: Any,
    num_classes: int,
    options: EvalOptions,
    actors: int,
    progress: Optional[Callable[[int, float], None]] = None,
) -> tuple[Tally, float]:
    """Stream the dataset through `actors` model replicas; returns the tally and the wall time."""
    import ray
    import ray.data

    from service.train.checkpoint import spec_to_dict

    predictions = dataset.map_batches(
        ModelActor,
        fn_constructor_kwargs={"spec_dict": spec_to_dict(spec), "state": ray.put(state), "mean": list(mean),
                               "std": list(std), "threads": int(options.cpus_per_actor)},
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=options.cpus_per_actor,
    )
    tally = Tally(num_classes)
    started = time.monotonic()
    for batch in predictions.iter_batches(batch_size=None, batch_format="numpy"):
        tally.add(batch["label"], batch["top"], batch["nll"])
        if progress is not None:
            progress(tally.count, time.monotonic() - started)
    return tally, time.monotonic() - started
