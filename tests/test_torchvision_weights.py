"""torchvision's AlexNet weights load into `alexnet_owt` and give the same logits.

torchvision is a test-only dependency, installed next to the CPU torch
without pulling a second torch: `pip install torchvision==0.28.0` (its
`torch==2.13.0` requirement is met by 2.13.0+cpu). PyPI's Linux wheel is built
against CUDA torch, so its compiled ops (`_C.so`) do not load here; torchvision
0.28 then fails at import registering fake kernels for `torchvision::nms`
(pytorch/vision#9337, fixed upstream by guarding that registration,
pytorch/vision PR #9649). `_import_torchvision` does what that fix does:
declares the two op schemas, without kernels, so the pure-Python model code
imports. AlexNet uses none of torchvision's compiled ops. No weights are
downloaded: torchvision's model is built with random init.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from service.model import ReferenceAlexNet
from service.model.torchvision_weights import from_torchvision, load_torchvision_file, to_torchvision


def _import_torchvision():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed (test-only): pip install torchvision==0.28.0")
    try:
        import torchvision

        return torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "FRAGMENT")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _import_torchvision.library = library  # keep the declarations alive
    import torchvision

    return torchvision


@pytest.fixture(scope="module")
def torchvision_alexnet(tmp_path_factory):
    """torchvision's AlexNet with random weights, saved as a .pth like the published file."""
    torchvision = _import_torchvision()
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    path = tmp_path_factory.mktemp("tv") / "alexnet-random.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_converted_weights_give_torchvisions_logits(torchvision_alexnet):
    model, path = torchvision_alexnet
    spec, state = load_torchvision_file(str(path))
    assert spec.name == "alexnet_owt" and spec.towers == 1 and spec.num_classes == 1000
    ours = ReferenceAlexNet(spec).eval()
    ours.load_state_dict(state)  # strict: every parameter mapped
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in model.parameters()) == 61_100_840
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = model(images), ours(images)
    assert expected.abs().max() > 0  # random init still gives non-trivial logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(actual.argmax(1), expected.argmax(1))


def test_conversion_round_trips_exactly(torchvision_alexnet):
    model, _ = torchvision_alexnet
    original = model.state_dict()
    _, converted = from_torchvision(original)
    back = to_torchvision(converted)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_wrong_weights_are_named(torchvision_alexnet, tmp_path):
    model, _ = torchvision_alexnet
    state = dict(model.state_dict())
    state["features.3.weight"] = torch.zeros(96, 64, 5, 5)
    with pytest.raises(ValueError, match=r"conv2.weight has shape \[96, 64, 5, 5\]"):
        from_torchvision(state)
    del state["classifier.6.bias"]
    with pytest.raises(ValueError, match="missing keys.*classifier.6.bias"):
        from_torchvision(state)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_torchvision_file(str(tmp_path / "absent.pth"))
