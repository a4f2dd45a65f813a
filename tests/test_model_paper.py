"""The paper's figures for the two-tower AlexNet (Krizhevsky et al., 2012)."""

import pytest
import torch

from service.model import (
    AlexNetTower,
    ReferenceAlexNet,
    alexnet_owt_spec,
    alexnet_spec,
    tower_divisibility_problems,
)
from service.model.summary import layer_table


def test_paper_parameter_count_two_towers_1000_classes():
    model = ReferenceAlexNet(alexnet_spec(num_classes=1000, image_size=224, towers=2))
    assert sum(p.numel() for p in model.parameters()) == 60_965_224


def test_tower_parameters_add_up_to_reference():
    spec = alexnet_spec(towers=2)
    towers = [AlexNetTower(spec, t) for t in range(2)]
    assert sum(p.numel() for tower in towers for p in tower.parameters()) == 60_965_224


def test_paper_map_sizes_and_macs():
    rows, totals = layer_table(alexnet_spec(towers=2))
    sizes = {row.layer: row.output_shape[-1] for row in rows if row.layer.startswith(("conv", "pool"))}
    assert [sizes[k] for k in ("conv1", "pool1", "pool2", "conv3", "conv4", "pool5")] == [55, 27, 13, 13, 13, 6]
    assert totals.parameters == 60_965_224
    assert 0.70e9 < totals.macs < 0.74e9


def test_reference_forward_shape_and_groups():
    spec = alexnet_spec(num_classes=1000, towers=2)
    model = ReferenceAlexNet(spec)
    assert model.conv2.groups == 2 and model.conv4.groups == 2 and model.conv5.groups == 2
    assert model.conv3.groups == 1
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 3, 224, 224))
    assert out.shape == (2, 1000)


def test_paper_initialisation():
    model = ReferenceAlexNet(alexnet_spec(towers=2))
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert torch.all(getattr(model, name).bias == 1.0), name
    for name in ("conv1", "conv3", "fc8"):
        assert torch.all(getattr(model, name).bias == 0.0), name
    std = model.fc6.weight.std().item()
    assert abs(std - 0.01) < 0.0005


def test_owt_variant_matches_torchvision_sizes():
    spec = alexnet_owt_spec(num_classes=1000, towers=1)
    model = ReferenceAlexNet(spec)
    # torchvision.models.alexnet has 61,100,840 parameters.
    assert sum(p.numel() for p in model.parameters()) == 61_100_840
    assert not model.lrns


def test_lrn_does_not_cross_towers():
    """Changing tower 1's conv1 maps must not change tower 0's LRN output."""
    spec = alexnet_spec(towers=2, width_mult=0.25, image_size=64)
    lrn = ReferenceAlexNet(spec).lrns["conv1"]
    x = torch.rand(1, spec.convs[0].out_channels, 5, 5)
    y = x.clone()
    half = x.shape[1] // 2
    y[:, half:] *= 10
    assert torch.equal(lrn(x)[:, :half], lrn(y)[:, :half])
    assert not torch.equal(lrn(x)[:, half:], lrn(y)[:, half:])


def test_lrn_uses_paper_alpha():
    """b = a / (k + alpha * sum a^2)^beta with the paper's alpha=1e-4, n=5, k=2."""
    spec = alexnet_spec(towers=1, width_mult=0.25, image_size=64)
    lrn = ReferenceAlexNet(spec).lrns["conv1"]
    x = torch.full((1, 8, 1, 1), 10.0)
    # channel 4 sees a full window of 5 maps of value 10.
    expected = 10.0 / (2.0 + 1e-4 * 5 * 100.0) ** 0.75
    assert lrn(x)[0, 4, 0, 0].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"towers": 3}, "towers=3 is not one of"),
        ({"towers": 8, "num_classes": 5}, "num_classes=5 is smaller than towers=8"),
        ({"towers": 8, "width_mult": 0.25, "image_size": 16}, "too small"),
    ],
)
def test_spec_problems_are_explained(kwargs, message):
    problems = tower_divisibility_problems(alexnet_spec(**kwargs))
    assert any(message in p for p in problems), problems
    with pytest.raises(ValueError, match="cannot build"):
        ReferenceAlexNet(alexnet_spec(**kwargs))
