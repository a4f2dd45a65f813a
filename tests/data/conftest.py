"""Fixtures of the data-layer tests: the session's Ray cluster and cached synthetic datasets."""

from __future__ import annotations

import pytest

from service.data.synthetic import SynthConfig, generate


@pytest.fixture(scope="session")
def ray_local(ray_session):
    """The session's Ray cluster (tests/conftest.py), under the name the data tests use."""
    return ray_session


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """make(layout, **overrides) -> (raw root, manifest); generated once per parameter set."""
    cache: dict = {}

    def make(layout: str = "imagefolder", **overrides):
        params = dict(classes=4, images_per_class=6, val_per_class=3, seed=7, size_scale=0.12,
                      bad_inputs=False, layout=layout)
        params.update(overrides)
        key = tuple(sorted(params.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"raw-{layout}")
            cache[key] = (str(out), generate(SynthConfig(out=str(out), **params)))
        return cache[key]

    return make
