"""A trained AlexNet with everything needed to use it: torch only, no MLflow.

`ModelCard` is what a model needs besides its weights (architecture, class
list, normalisation, crop geometry); `save_model_files`/`load_model_files`
write and read it next to a plain PyTorch state dict (`weights.pt`, loadable
with `torch.load(..., weights_only=True)` for fine-tuning). `Classifier`
turns images into the top-k classes; `crop_probabilities` is the one place
that averages softmax over crops, exactly as training's validation does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from service.model import AlexNetSpec, ReferenceAlexNet
from service.serving.preprocess import ImageInput, preprocess
from service.train.checkpoint import spec_from_dict, spec_to_dict
from service.train.step import Normalizer

WEIGHTS_FILE = "weights.pt"
CARD_FILE = "model.json"


@dataclass
class ModelCard:
    """Everything but the weights: how to build, feed and read the network."""

    spec: AlexNetSpec
    # -- Class i is wnids[i] ("n01440764"), names[i] its human name.
    wnids: list[str]
    names: list[str]
    # -- Per-channel RGB mean/std in 0-255 units (training set statistics).
    mean: list[float]
    std: list[float]
    # -- Shorter side images are resized to before cropping `spec.image_size`.
    resize_size: int
    # -- 1 (centre crop) or 10 (the paper's 4 corners + centre, mirrored).
    crops: int = 1
    # -- Where the weights came from (run id, epoch, step, validation metrics).
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["spec"] = spec_to_dict(self.spec)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        return cls(**{**data, "spec": spec_from_dict(data["spec"])})


def save_model_files(folder: Path, card: ModelCard, state: dict[str, torch.Tensor]) -> Path:
    """Write `weights.pt` (reference layout state dict) and `model.json` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(card.wnids) != card.spec.num_classes or len(card.names) != card.spec.num_classes:
        raise ValueError(
            f"the model has {card.spec.num_classes} classes but the class list has "
            f"{len(card.wnids)} wnids and {len(card.names)} names"
        )
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / WEIGHTS_FILE)
    (folder / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2))
    return folder


def load_model_files(folder: Path) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """(card, state dict) from a folder written by `save_model_files`."""
    folder = Path(folder)
    for name in (CARD_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: not a model folder written by this service")
    card = ModelCard.from_dict(json.loads((folder / CARD_FILE).read_text()))
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return card, state


def build_network(spec: AlexNetSpec, state: dict[str, torch.Tensor]) -> ReferenceAlexNet:
    """The single-process network in eval mode with `state` loaded (strict)."""
    network = ReferenceAlexNet(spec)
    network.load_state_dict(state)
    return network.eval()


@torch.no_grad()
def crop_probabilities(network: torch.nn.Module, normalizer: Normalizer, images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, S, S, 3] or [N, crops, S, S, 3] -> [N, classes] softmax averaged over crops.

    The same arithmetic as `service.train.step.evaluate` (fp32 on CPU), so a
    model scores the same here as in its training run's validation.
    """
    crops = images.shape[1] if images.dim() == 5 else 1
    flat = images.reshape(-1, *images.shape[-3:])
    logits = network(normalizer(flat)).float()
    return logits.softmax(dim=1).view(-1, crops, logits.shape[1]).mean(dim=1)


class Classifier:
    """Images in, top-k classes out."""

    def __init__(self, card: ModelCard, state: dict[str, torch.Tensor], threads: Optional[int] = None):
        if threads:
            torch.set_num_threads(threads)
        self.card = card
        self.network = build_network(card.spec, state)
        self.normalizer = Normalizer(card.mean, card.std, torch.device("cpu"), channels_last=False)

    def probabilities(self, images: list[ImageInput]) -> np.ndarray:
        """[N, classes] class probabilities; `BadImage` names a bad input."""
        batch = preprocess(images, self.card.resize_size, self.card.spec.image_size, self.card.crops)
        return crop_probabilities(self.network, self.normalizer, torch.from_numpy(batch)).numpy()

    def top_k(self, images: list[ImageInput], k: int = 5) -> list[dict]:
        """Per image: {"wnids", "names", "probabilities"} of the k best classes, best first."""
        probs = self.probabilities(images)
        k = min(k, probs.shape[1])
        best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [
            {
                "wnids": [self.card.wnids[i] for i in row],
                "names": [self.card.names[i] for i in row],
                "probabilities": [float(p) for p in probs[n, row]],
            }
            for n, row in enumerate(best)
        ]
