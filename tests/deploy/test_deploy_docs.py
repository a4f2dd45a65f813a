"""docs/kubernetes.md must match the chart: the values it names exist, the secret keys
it creates are the ones the chart reads, its example values render, and the KubeRay
operator it installs is the one the chart is validated against."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from deploy_support import CHART, CI_VALUES, NAMESPACE, load_values
from tests.helpers import REPO

DOC = (REPO / "docs" / "kubernetes.md").read_text()
DEFAULTS = load_values(CHART / "values.yaml")


def _has_path(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_operator_version_matches_chart():
    pinned = yaml.safe_load((CHART / "Chart.yaml").read_text())["annotations"][
        "kuberay.io/operator-version"]
    installs = re.findall(r"kuberay/kuberay-operator\s*\\?\s*--version (\S+)", DOC)
    assert installs == [pinned]


def test_every_values_path_in_the_doc_exists():
    tops = tuple(f"{key}." for key in DEFAULTS)
    named = set(re.findall(r"`([a-zA-Z]+(?:\.[a-zA-Z0-9]+)+)`", DOC))
    named |= set(re.findall(r"--set ([a-zA-Z.]+)=", DOC))
    paths = {p.rstrip(".*") for p in named if p.startswith(tops)}
    assert paths, "the doc names no values"
    missing = sorted(p for p in paths if not _has_path(DEFAULTS, p))
    assert not missing, f"docs/kubernetes.md names values the chart lacks: {missing}"


def test_secret_keys_created_in_the_doc_are_the_keys_the_chart_reads():
    created = set(re.findall(r"--from-literal=([a-z_-]+)=", DOC))
    chart_keys = {"auth_token"}  # fixed by KubeRay, not a value
    text = (CHART / "values.yaml").read_text() + "".join(p.read_text() for p in CI_VALUES)
    chart_keys |= set(re.findall(r"(?:Key|KeyIdKey|AccessKeyKey):\s*([a-z_-]+)", text))
    assert created <= chart_keys, f"doc creates keys the chart never reads: {created - chart_keys}"
    for needed in ("access-key-id", "secret-access-key", "auth_token", "admin-password",
                   "flask-secret-key", "dsn"):
        assert needed in created, f"the doc does not create key {needed}"


def test_doc_example_values_render(render):
    block = DOC.split("## 3. Values", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    values = yaml.safe_load(block)
    rendered = render(values)
    job = rendered.one("RayJob")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert workers["replicas"] * gpus == values["training"]["replicas"] * values["training"]["towers"]
    assert "parallel.replicas=4" in job["spec"]["entrypoint"]


@pytest.mark.parametrize("name", ["alexnet-mlflow", "alexnet-ingest"])
def test_resource_names_in_the_doc(chart, name):
    """The doc uses release `alexnet`; names there must be what the chart creates."""
    values = load_values(next(p for p in CI_VALUES if "bundled" in p.stem))
    manifests = chart.render(values, name="alexnet", namespace=NAMESPACE)
    names = {doc["metadata"]["name"] for path, body in manifests.items()
             if not path.endswith("NOTES.txt")
             for doc in yaml.safe_load_all(body) if isinstance(doc, dict) and "metadata" in doc}
    assert name in names and "alexnet" in names
    assert name in DOC


# ---------- docs/docker.md and the repository paths both docs name ----------

DOCS = {name: (REPO / "docs" / name).read_text() for name in ("kubernetes.md", "docker.md")}
TORCH_2_13_INDEXES = {"cpu", "cu126", "cu130"}
REPO_ROOTS = ("k8s/", "docker/", "docs/", "tests/", "service/", "conf/", "bench/", ".ci/")


@pytest.mark.parametrize("path", ["docs/docker.md", "docs/kubernetes.md", "Makefile",
                                  "docker/Dockerfile", "docker/Dockerfile.cpu"])
def test_torch_index_urls_name_builds_that_exist(path):
    """Every PyTorch index named is one torch 2.13 publishes (cu128 does not exist)."""
    text = (REPO / path).read_text()
    named = set(re.findall(r"download\.pytorch\.org/whl/([a-z0-9]+)", text))
    assert named <= TORCH_2_13_INDEXES, f"{path} names {sorted(named - TORCH_2_13_INDEXES)}"


def test_docker_doc_states_the_image_defaults():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    cuda = re.search(r"^ARG CUDA=(cu\d+)$", dockerfile, re.M).group(1)
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1)
    doc = DOCS["docker.md"]
    assert f"`rayproject/ray:2.60.0-py311-{cuda}`" in doc
    assert f"https://download.pytorch.org/whl/{cuda}" in doc
    assert f"default `{torch}`" in doc and f"Default `{cuda}`" in doc
    cpu = (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-cpu$", cpu, re.M)
    assert "`rayproject/ray:2.60.0-py311-cpu`" in doc


@pytest.mark.parametrize("name", sorted(DOCS))
def test_docs_name_only_files_of_the_repository(name):
    """Repository paths in backticks exist; the only place outside is ../shared/schemas/kuberay/."""
    doc = DOCS[name]
    outside = set(re.findall(r"(?<![.\w])\.\./[\w./-]+", doc))
    assert outside <= {"../shared/schemas/kuberay/"}, f"{name} points outside the repository: {outside}"
    assert "../shared/schemas/kuberay/` (a folder\nbeside this repository, not part of it" in DOCS[
        "kubernetes.md"]
    generated = (REPO / ".gitignore").read_text()  # run outputs (bench/results) are named, not kept
    missing = []
    for path in re.findall(r"`([.\w/-]+)`", doc):
        if path.startswith(REPO_ROOTS) and not (REPO / path.rstrip("/")).exists() and path not in generated:
            missing.append(path)
    assert not missing, f"{name} names files that do not exist: {missing}"
