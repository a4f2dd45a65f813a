"""Fixtures of the deployment tests: the chart rendered by the real Helm engine
(helm-python-sdk, no helm binary, no cluster) and offline schema validators."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import yaml

# The test modules import their helpers from deploy_support.py beside this file,
# whatever pytest import mode the project uses.
sys.path.insert(0, str(Path(__file__).parent))

from deploy_support import (  # noqa: E402
    CHART,
    KUBERAY_SCHEMAS,
    MINIMAL_VALUES,
    NAMESPACE,
    RELEASE,
    Rendered,
    crd_validators_from,
    deep_merge,
    load_values,
    values_cases,
)
from tests.helpers import skip_or_fail_in_ci  # noqa: E402


@pytest.fixture(scope="session")
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """JSON Schema validators of the KubeRay CRDs, keyed by (apiVersion, kind)."""
    needed = ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml")
    missing = [name for name in needed if not (KUBERAY_SCHEMAS / name).is_file()]
    if missing:
        skip_or_fail_in_ci(f"KubeRay CRD schemas not found: {missing} under {KUBERAY_SCHEMAS} "
                           "(expected the shared/ folder beside the repository)")
    return crd_validators_from(KUBERAY_SCHEMAS)


# ---------- the Helm engine ----------

@pytest.fixture(scope="session")
def helm():
    """The helm-python-sdk module (Helm's Go library through ctypes)."""
    import helm_python  # declared in the test extra: its absence is an install error, not a skip

    helm_python.disable_logging()
    return helm_python


@pytest.fixture(scope="session")
def chart(helm):
    """The loaded chart."""
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart) -> Callable[..., Rendered]:
    """render(values) -> Rendered, as `helm template demo <chart> -n ml -f values` would."""
    cache: dict[str, Rendered] = {}

    def _render(values: dict[str, Any]) -> Rendered:
        key = yaml.safe_dump(values, sort_keys=True)
        if key not in cache:
            manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            cache[key] = Rendered(manifests, values)
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def minimal_values() -> dict[str, Any]:
    """The fewest values the chart renders with (secret names and S3 locations)."""
    return load_values(MINIMAL_VALUES)


@pytest.fixture(scope="session")
def render_failure(chart, helm, minimal_values) -> Callable[[dict[str, Any]], str]:
    """render_failure(override) -> the error message of rendering minimal values + override,
    which must fail (schema or template), as `helm install` would."""

    def _fail(override: dict[str, Any]) -> str:
        with pytest.raises((helm.HelmRenderError, helm.HelmValuesError)) as raised:
            chart.render(deep_merge(minimal_values, override), name=RELEASE, namespace=NAMESPACE)
        return str(raised.value)

    return _fail


@pytest.fixture(params=values_cases())
def case(request, render) -> Rendered:
    """One render case (parametrized over `values_cases`)."""
    return render(load_values(request.param))
