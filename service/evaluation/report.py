"""From the tally to figures people read: errors, per-class accuracy, confusions."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from service.evaluation.inference import Tally


@dataclass
class EvaluationResult:
    """What one evaluation measured."""

    images: int
    top1_error: float
    top5_error: float
    loss: float
    # -- Per class: top-1 accuracy and validation images (index = label).
    per_class_accuracy: np.ndarray
    per_class_images: np.ndarray
    # -- (true label, predicted label, images), most frequent first.
    confused_pairs: list[tuple[int, int, int]]
    images_per_s: float
    seconds: float


def summarize(tally: Tally, seconds: float, num_pairs: int) -> EvaluationResult:
    """Errors over all images, per-class accuracy, and the `num_pairs` most confused class pairs."""
    count = tally.count
    if count == 0:
        raise RuntimeError("the evaluation saw no images: is the validation split empty?")
    confusion = tally.confusion
    per_class_images = confusion.sum(axis=1)
    correct = np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class_accuracy = np.where(per_class_images > 0, correct / np.maximum(per_class_images, 1), np.nan)
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    flat = np.argsort(-off_diagonal, axis=None, kind="stable")[:num_pairs]
    pairs = [(int(t), int(p), int(off_diagonal[t, p])) for t, p in zip(*np.unravel_index(flat, confusion.shape))]
    return EvaluationResult(
        images=count,
        top1_error=1.0 - correct.sum() / count,
        top5_error=1.0 - tally.top5_hits / count,
        loss=tally.nll_sum / count,
        per_class_accuracy=per_class_accuracy,
        per_class_images=per_class_images,
        confused_pairs=[pair for pair in pairs if pair[2] > 0],
        images_per_s=count / max(seconds, 1e-9),
        seconds=seconds,
    )


def format_report(result: EvaluationResult, wnids: list[str], names: list[str], max_class_rows: int = 40) -> str:
    """The console summary: headline errors, per-class accuracy, most confused pairs."""
    lines = [
        "=== evaluation ===",
        f"  images            {result.images}",
        f"top-1 error {100 * result.top1_error:.3f}%",
        f"top-5 error {100 * result.top5_error:.3f}%",
        f"  loss              {result.loss:.4f}",
        f"  images/s          {result.images_per_s:.0f} ({result.seconds:.1f} s)",
    ]
    order = np.argsort(np.nan_to_num(result.per_class_accuracy, nan=2.0), kind="stable")
    shown = order if len(order) <= max_class_rows else order[:max_class_rows]
    title = "per-class top-1 accuracy"
    if len(order) > max_class_rows:
        title += f" (the {max_class_rows} worst of {len(order)}; all in per_class_accuracy.csv)"
    lines.append(f"{title}:")
    for label in shown:
        accuracy = result.per_class_accuracy[label]
        shown_accuracy = "   n/a" if np.isnan(accuracy) else f"{100 * accuracy:5.1f}%"
        images = result.per_class_images[label]
        lines.append(f"  {wnids[label]:<12} {names[label][:32]:<32} {shown_accuracy} of {images}")
    lines.append(f"most confused pairs (true -> predicted: images, share of the true class), "
                 f"{len(result.confused_pairs)} shown:")
    for true, predicted, count in result.confused_pairs:
        share = count / max(1, result.per_class_images[true])
        lines.append(f"  {names[true][:28]:<28} -> {names[predicted][:28]:<28} {count:5d} ({100 * share:.1f}%)")
    return "\n".join(lines)


def per_class_csv(result: EvaluationResult, wnids: list[str], names: list[str]) -> bytes:
    """label, wnid, name, images, top-1 accuracy, for every class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["label", "wnid", "name", "images", "top1_accuracy"])
    for label, (wnid, name) in enumerate(zip(wnids, names)):
        accuracy = result.per_class_accuracy[label]
        writer.writerow([label, wnid, name, int(result.per_class_images[label]),
                         "" if np.isnan(accuracy) else f"{accuracy:.6f}"])
    return buffer.getvalue().encode()
