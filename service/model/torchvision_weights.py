"""torchvision's AlexNet weights <-> this project's `alexnet_owt` (plain torch).

torchvision's `alexnet` is Krizhevsky's single-tower "one weird trick"
network, 64-192-384-256-256 kernels and no LRN: parameter for parameter our
`alexnet_owt` with towers=1. Only the names differ, so conversion is a
renaming, checked shape by shape. torchvision feeds images scaled to [0, 1]
and normalised with the ImageNet mean/std below; in this project's 0-255
units that is `IMAGENET_MEAN_255` / `IMAGENET_STD_255`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from service.model.reference import ReferenceAlexNet
from service.model.spec import AlexNetSpec, alexnet_owt_spec

# torchvision module name -> ReferenceAlexNet module name.
TORCHVISION_TO_REFERENCE = {
    "features.0": "conv1",
    "features.3": "conv2",
    "features.6": "conv3",
    "features.8": "conv4",
    "features.10": "conv5",
    "classifier.1": "fc6",
    "classifier.4": "fc7",
    "classifier.6": "fc8",
}
IMAGENET_MEAN_255 = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD_255 = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def torchvision_spec(num_classes: int = 1000, image_size: int = 224) -> AlexNetSpec:
    """The `alexnet_owt` spec torchvision's weights fit (one tower)."""
    return alexnet_owt_spec(num_classes=num_classes, image_size=image_size, towers=1)


def _rename(state: dict[str, torch.Tensor], mapping: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    expected = {f"{module}.{kind}" for module in mapping for kind in ("weight", "bias")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"not {what} AlexNet weights: missing keys {missing}, unexpected keys {unexpected}")
    out = {}
    for key, tensor in state.items():
        module, kind = key.rsplit(".", 1)
        out[f"{mapping[module]}.{kind}"] = tensor
    return out


def from_torchvision(
    state: dict[str, torch.Tensor], image_size: int = 224
) -> tuple[AlexNetSpec, dict[str, torch.Tensor]]:
    """(spec, ReferenceAlexNet state dict) from torchvision's `alexnet().state_dict()`.

    The class count is read from the last layer; every shape is checked
    against the `alexnet_owt` spec, and a mismatch names the layer.
    """
    renamed = _rename(state, TORCHVISION_TO_REFERENCE, "torchvision")
    spec = torchvision_spec(num_classes=int(renamed["fc8.weight"].shape[0]), image_size=image_size)
    expected = {k: v.shape for k, v in ReferenceAlexNet(spec).state_dict().items()}
    for key, shape in expected.items():
        if tuple(renamed[key].shape) != tuple(shape):
            raise ValueError(
                f"{key} has shape {list(renamed[key].shape)}, alexnet_owt expects {list(shape)}: "
                "not torchvision's AlexNet"
            )
    return spec, renamed


def to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's names for an `alexnet_owt` (one tower) state dict."""
    return _rename(state, {v: k for k, v in TORCHVISION_TO_REFERENCE.items()}, "alexnet_owt")


def load_torchvision_file(path: str, image_size: int = 224) -> tuple[AlexNetSpec, dict[str, torch.Tensor]]:
    """Read a torchvision AlexNet `.pth` (e.g. alexnet-owt-7be5be79.pth) safely (weights only)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights={path}: no such file (torchvision's file is alexnet-owt-7be5be79.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights={path} holds a {type(state).__name__}, not a state dict")
    return from_torchvision(state, image_size)
