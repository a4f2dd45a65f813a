"""What the torch-only loop tests (no Ray) share: the hooks that record what
`run_training` reports, and batches of synthetic images."""

from __future__ import annotations

import copy

import torch

from service.train.loop import Progress


class RecordingHooks:
    """`run_training`'s hooks, recording: each logged step (step, loss), each
    epoch end (epoch, metrics, conv1 weight shape), each checkpoint (a copy
    of its progress and tower state)."""

    def __init__(self):
        self.steps, self.epochs, self.checkpoints = [], [], []

    def on_step(self, progress, metrics):
        self.steps.append((progress.step, metrics["loss"]))

    def on_epoch_end(self, progress, metrics, conv1_weight):
        self.epochs.append((progress.epoch, metrics, conv1_weight.shape))

    def save_checkpoint(self, progress, tower_state, metrics):
        self.checkpoints.append((Progress(**vars(progress)), copy.deepcopy(tower_state)))

    @property
    def losses(self) -> list[float]:
        return [loss for _, loss in self.steps]


def synthetic_batches(count: int, batch: int = 8, num_classes: int = 8, size: int = 64, seed: int = 0,
                      device="cpu", learnable: bool = False) -> list[dict]:
    """`count` device batches (uint8 NHWC images, labels, zero lighting) of random
    pixels; `learnable`: dark noise plus a colour channel (and for class 3 a
    white top half) set by the label, so a few steps learn it."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        labels = torch.randint(0, num_classes, (batch,), generator=generator)
        image = torch.randint(0, 40 if learnable else 256, (batch, size, size, 3), generator=generator,
                              dtype=torch.uint8)
        if learnable:
            for index, label in enumerate(labels.tolist()):
                image[index, :, :, label % 3] += 180
                if label == 3:
                    image[index, : size // 2] = 255
        out.append({"image": image.to(device), "label": labels.to(device),
                    "lighting": torch.zeros(batch, 3, device=device)})
    return out
