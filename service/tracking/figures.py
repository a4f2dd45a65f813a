"""Figures logged to MLflow: conv1 kernels per tower, learning curves, evaluation results."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _kernel_grid(kernels: torch.Tensor) -> torch.Tensor:
    """[K, 3, h, w] → one RGB image [H, W, 3] of tiles, each kernel scaled to [0, 1]."""
    count, _, height, width = kernels.shape
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / columns)
    low = kernels.amin(dim=(1, 2, 3), keepdim=True)
    high = kernels.amax(dim=(1, 2, 3), keepdim=True)
    tiles = (kernels - low) / (high - low).clamp_min(1e-12)
    grid = torch.ones(rows * (height + 1), columns * (width + 1), 3)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = row * (height + 1), column * (width + 1)
        grid[top : top + height, left : left + width] = tiles[index].permute(1, 2, 0)
    return grid


def conv1_kernels_png(conv1_weight: torch.Tensor, towers: int, title: str = "") -> bytes:
    """The paper's figure 3: conv1 kernels, one panel per tower.

    With two towers one set tends to become colour-agnostic and the other
    colour-specific, because conv2 only sees its own tower's maps.
    """
    weight = conv1_weight.detach().float().cpu()
    per_tower = weight.chunk(towers, dim=0)
    figure, axes = plt.subplots(1, towers, figsize=(4 * towers, 4.4), squeeze=False)
    for tower, (axis, kernels) in enumerate(zip(axes[0], per_tower)):
        axis.imshow(_kernel_grid(kernels).numpy(), interpolation="nearest")
        axis.set_title(f"tower {tower}: {len(kernels)} conv1 kernels")
        axis.axis("off")
    if title:
        figure.suptitle(title)
    return _png(figure)


def learning_curves_png(history: dict[str, list[tuple[int, float]]]) -> bytes:
    """Train loss per step and val top-1/top-5 error per epoch-end step."""
    figure, (loss_axis, error_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "train_loss", "val_loss"):
        if history.get(key):
            steps, values = zip(*history[key])
            loss_axis.plot(steps, values, label=key, marker="." if key != "loss" else None)
    loss_axis.set_xlabel("step")
    loss_axis.set_title("loss")
    loss_axis.legend()
    for key in ("train_top1_error", "val_top1_error", "val_top5_error"):
        if history.get(key):
            steps, values = zip(*history[key])
            error_axis.plot(steps, values, label=key, marker="o")
    error_axis.set_xlabel("step")
    error_axis.set_ylim(0, 1)
    error_axis.set_title("error")
    error_axis.legend()
    return _png(figure)


def evaluation_png(per_class_accuracy, names: list[str], confused_pairs: list[tuple[int, int, int]],
                   title: str = "") -> bytes:
    """Per-class top-1 accuracy (sorted) and the most confused (true -> predicted) class pairs."""
    import numpy as np

    accuracy = np.asarray(per_class_accuracy, dtype=float)
    figure, (class_axis, pair_axis) = plt.subplots(1, 2, figsize=(13, max(4.0, 0.28 * len(confused_pairs) + 1.5)))
    order = np.argsort(np.nan_to_num(accuracy, nan=-1.0))
    if len(accuracy) <= 40:
        class_axis.barh([names[i][:24] for i in order], accuracy[order], color="tab:blue")
        class_axis.set_xlim(0, 1)
        class_axis.tick_params(axis="y", labelsize=7)
    else:  # 1000 classes: the sorted curve says more than 1000 bars
        class_axis.plot(np.arange(len(order)), accuracy[order])
        class_axis.set_xlabel("classes, sorted")
        class_axis.set_ylim(0, 1)
    class_axis.set_title("per-class top-1 accuracy")
    labels = [f"{names[t][:20]} -> {names[p][:20]}" for t, p, _ in confused_pairs][::-1]
    counts = [count for _, _, count in confused_pairs][::-1]
    pair_axis.barh(labels, counts, color="tab:red")
    pair_axis.tick_params(axis="y", labelsize=7)
    pair_axis.set_title(f"{len(confused_pairs)} most confused pairs (images)")
    if title:
        figure.suptitle(title)
    return _png(figure)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()
