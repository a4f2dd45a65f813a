"""Layout validation happens before any process group exists."""

from dataclasses import replace

import pytest
import torch.distributed as dist

from service.model import alexnet_spec
from service.parallel.layout import ParallelLayout


def test_ranks_and_groups():
    layout = ParallelLayout(replicas=3, towers=2)
    assert layout.world_size == 6
    assert layout.tower_group_ranks(1) == [2, 3]
    assert layout.data_parallel_ranks(1) == [1, 3, 5]
    assert (layout.replica_of(5), layout.tower_of(5)) == (2, 1)
    assert layout.rank_of(2, 1) == 5


def test_world_size_not_multiple_of_towers():
    with pytest.raises(ValueError, match=r"world size 6 is not a multiple of towers=4.*world size of 4"):
        ParallelLayout.from_world_size(6, 4)
    assert not dist.is_initialized()


def test_towers_not_allowed():
    with pytest.raises(ValueError, match=r"towers=3 is not allowed; choose one of \[1, 2, 4, 8\]"):
        ParallelLayout(replicas=1, towers=3)


def test_channels_not_divisible():
    spec = alexnet_spec(towers=8)
    convs = list(spec.convs)
    convs[1] = replace(convs[1], out_channels=100)
    spec = replace(spec, convs=tuple(convs))
    with pytest.raises(ValueError, match="conv2 has 100 kernels, not divisible by towers=8"):
        ParallelLayout(1, 8).validate_model(spec)
    assert not dist.is_initialized()


def test_classes_fewer_than_towers():
    with pytest.raises(ValueError, match="num_classes=3 is smaller than towers=4"):
        ParallelLayout(2, 4).validate_model(alexnet_spec(towers=4, num_classes=3))


def test_batch_must_divide_over_replicas():
    with pytest.raises(ValueError, match="global batch 10 does not divide over 4 replicas.*e.g. 8"):
        ParallelLayout(4, 2).validate_batch(10)
    assert ParallelLayout(4, 2).validate_batch(128) == 32
