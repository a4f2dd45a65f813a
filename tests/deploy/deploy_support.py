"""Helpers of the deployment tests: render cases, object walkers, CRD -> JSON Schema.

The KubeRay CRDs come from `<repo>/../shared/schemas/kuberay/` (a fresh clone has
`shared/` beside it); the tests that need them skip with the reason if it is absent.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from tests.helpers import REPO

CHART = REPO / "k8s" / "helm" / "alexnet"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
MINIMAL_VALUES = Path(__file__).with_name("minimal-values.yaml")
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
RELEASE = "demo"
NAMESPACE = "ml"
# Kubernetes versions the manifests are validated against: the chart's kubeVersion floor and the newest.
KUBE_VERSIONS = ("1.29.0", "1.37.0")


# Kubernetes quantity suffixes the chart accepts (a test-side reading, independent of the chart's own
# arithmetic in _sizing.tpl; the `kubernetes` client's parse_quantity would pull a whole API client in).
QUANTITY_FACTORS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("96Gi", "500m", "16", 2.5) as a number (bytes or CPUs)."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    number = text.rstrip("kMGTi")
    return float(number) * QUANTITY_FACTORS[text[len(number):]]


def load_values(path: Path) -> dict[str, Any]:
    """A values file as a dict."""
    return yaml.safe_load(path.read_text()) or {}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged onto a copy of `base` (what `helm -f a -f b` does)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class Rendered:
    """One render of the chart: the objects, the raw text and the values used."""

    def __init__(self, manifests: dict[str, str], values: dict[str, Any]):
        self.values = values
        self.notes = manifests.get("alexnet/templates/NOTES.txt", "")
        self.text = "\n---\n".join(
            body for name, body in sorted(manifests.items()) if not name.endswith("NOTES.txt")
        )
        self.objects: list[dict[str, Any]] = [
            doc for doc in yaml.safe_load_all(self.text) if doc
        ]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Objects of one kind."""
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        """The single object of a kind."""
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]


def chart_values(case: "Rendered") -> dict[str, Any]:
    """Chart defaults merged with the case's values (what the templates saw)."""
    return deep_merge(load_values(CHART / "values.yaml"), case.values)


def ray_cluster_spec(case: "Rendered") -> dict[str, Any]:
    """The RayCluster spec of a render, in either mode."""
    if chart_values(case)["mode"] == "rayjob":
        return case.one("RayJob")["spec"]["rayClusterSpec"]
    return case.one("RayCluster")["spec"]


def entrypoint_overrides(case: "Rendered") -> dict[str, str]:
    """The `key=value` Hydra overrides of the training entrypoint (RayJob, or NOTES in RayCluster mode)."""
    if chart_values(case)["mode"] == "rayjob":
        entrypoint = case.one("RayJob")["spec"]["entrypoint"]
    else:
        entrypoint = case.notes.split(" -- ", 1)[1].splitlines()[0]
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "service.train"], argv[:3]
    return dict(arg.split("=", 1) for arg in argv[3:])


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (where, pod template) in an object, RayJob/RayCluster groups included."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield f"{kind}/{obj['metadata']['name']}", spec["template"]
    elif kind in ("RayJob", "RayCluster"):
        if kind == "RayJob":
            if "submitterPodTemplate" in spec:
                yield "RayJob submitter", spec["submitterPodTemplate"]
            spec = spec["rayClusterSpec"]
        yield f"{kind} head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{kind} worker {group['groupName']}", group["template"]
    elif kind == "Pod":
        yield f"Pod/{obj['metadata']['name']}", obj


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Containers and init containers of a pod template."""
    spec = pod["spec"]
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


# ---------- KubeRay CRD -> JSON Schema ----------

def crd_to_json_schema(node: Any) -> Any:
    """Turn a CRD openAPIV3Schema into a JSON Schema (draft 7) the way the API server reads it.

    - `x-kubernetes-int-or-string` -> integer or string;
    - `x-kubernetes-preserve-unknown-fields` -> unknown fields allowed there;
    - `nullable` -> null allowed;
    - every other object with `properties` rejects unknown fields, like
      `kubectl apply --validate=strict` (the API server would prune them silently).
    """
    if isinstance(node, list):
        return [crd_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: crd_to_json_schema(sub) for name, sub in value.items()}
        else:
            out[key] = crd_to_json_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        out.pop("nullable")
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def crd_validators_from(directory: Path) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    validators = {}
    # libyaml's loader when PyYAML has it: the two CRDs are 2.3 MB of YAML, 3.6 s to parse in
    # pure Python here, 0.8 s with libyaml (same documents).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(directory.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = crd_to_json_schema(version["schema"]["openAPIV3Schema"])
            # apiVersion/kind/metadata are checked by the API server itself.
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            jsonschema.Draft7Validator.check_schema(schema)
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def values_cases() -> list[Any]:
    """The render cases: chart defaults + minimal values, then every ci/*.yaml alone."""
    cases = [pytest.param(MINIMAL_VALUES, id="default")]
    cases += [pytest.param(path, id=path.stem) for path in CI_VALUES]
    return cases
