"""Fixtures of the data-layer tests: a local Ray and cached synthetic datasets."""

from __future__ import annotations

import secrets

import pytest

from service.data.synthetic import SynthConfig, generate


@pytest.fixture(scope="session")
def ray_local(request, tmp_path_factory):
    """One Ray per test session: the shared `ray_session` cluster when tests/conftest.py
    defines it, else a local Ray (2 CPUs, token auth on, no telemetry, nothing in ~/.ray)."""
    import ray

    try:
        yield request.getfixturevalue("ray_session")
        return
    except pytest.FixtureLookupError:
        pass

    token = tmp_path_factory.mktemp("ray_auth") / "token"
    token.write_text(secrets.token_hex(32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=2, include_dashboard=False)
        yield ray
        if started:
            ray.shutdown()


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
