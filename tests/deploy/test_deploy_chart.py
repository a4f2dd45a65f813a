"""The Helm chart k8s/helm/alexnet, rendered by the real Helm engine and checked offline:
Helm lint, Kubernetes API schemas, KubeRay CRD schemas, and the chart's own promises
(GPU count, entrypoint, secrets by reference only, pod security, NetworkPolicies, no
external exposure, clear errors for bad values)."""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest

from deploy_support import (
    CHART,
    CI_VALUES,
    KUBE_VERSIONS,
    MINIMAL_VALUES,
    NAMESPACE,
    RELEASE,
    chart_values,
    containers,
    deep_merge,
    entrypoint_overrides,
    load_values,
    pod_specs,
    ray_cluster_spec,
)

REQUIRED_CI_CASES = {"1x2-rayjob-values", "1x8-one-node-values", "4x2-one-node-values",
                     "2x8-two-nodes-rdma-values", "raycluster-values", "bundled-postgres-minio-values"}
SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|DSN|BACKEND_STORE_URI")
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^@\s/'\"]+@")


def test_required_ci_values_files_exist():
    assert REQUIRED_CI_CASES <= {path.stem for path in CI_VALUES}


# ---------- Helm's own checks ----------

@pytest.mark.parametrize("values_file", [MINIMAL_VALUES, *CI_VALUES], ids=lambda p: p.stem)
def test_helm_lint_strict(helm, values_file):
    report = helm.lint(CHART, load_values(values_file), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_chart_metadata(chart):
    meta = chart.metadata
    assert meta["apiVersion"] == "v2" and meta["name"] == "alexnet"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert chart.schema is not None, "values.schema.json is missing"


def test_values_documented_field_by_field():
    """Every value is covered by a `# --` description on itself or on an enclosing key
    (helm-docs / KubeRay chart style; free-form maps are documented once, at their key)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    ancestors: list[tuple[int, bool]] = []  # (indent, covered) of the enclosing keys
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z0-9_./-]+):(\s+\S.*)?$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        above, documented = number - 1, False
        while above >= 0 and lines[above].strip().startswith("#"):
            documented |= lines[above].strip().startswith("# --")
            above -= 1
        covered = documented or any(c for _, c in ancestors)
        if match.group(3) is not None and not covered:
            undocumented.append(f"line {number + 1}: {match.group(2)}")
        ancestors.append((indent, covered))
    assert not undocumented, f"values without a '# --' description: {undocumented}"


# ---------- schema validation ----------

def test_rendered_objects_validate_against_kubernetes(case):
    core = [obj for obj in case.objects if not obj["apiVersion"].startswith("ray.io/")]
    assert core
    for version in KUBE_VERSIONS:
        for obj in core:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes "
                            f"{version}: {error.message} at {list(error.path)}")


def test_ray_objects_validate_against_kuberay_crds(case, crd_validators):
    ray_objects = [obj for obj in case.objects if obj["apiVersion"].startswith("ray.io/")]
    assert len(ray_objects) == 1, "exactly one RayJob or RayCluster per release"
    for obj in ray_objects:
        validator = crd_validators[(obj["apiVersion"], obj["kind"])]
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(
            f"{obj['kind']} {'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10]
        )


def test_crd_conversion_is_strict(crd_validators):
    """The converted CRD schema rejects unknown fields and wrong types (not a no-op)."""
    validator = crd_validators[("ray.io/v1", "RayJob")]
    good = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"},
            "spec": {"entrypoint": "python -m service.train", "backoffLimit": 1}}
    assert not list(validator.iter_errors(good))
    typo = deep_merge(good, {"spec": {"shutdownAfterJobFinish": True}})
    assert list(validator.iter_errors(typo))
    wrong_type = deep_merge(good, {"spec": {"backoffLimit": "two"}})
    assert list(validator.iter_errors(wrong_type))


# ---------- what the chart promises ----------

def test_total_gpus_equal_replicas_times_towers(case):
    values = chart_values(case)
    towers, replicas = values["training"]["towers"], values["training"]["replicas"]
    gpu_name = values["ray"]["worker"]["gpuResourceName"]
    spec = ray_cluster_spec(case)
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_name not in head_limits, "the head must not claim GPUs"
    total = 0
    for group in spec["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
        pod_gpus = sum(int(c["resources"]["limits"].get(gpu_name, 0))
                       for c in group["template"]["spec"]["containers"])
        assert pod_gpus % towers == 0, "a replica's towers must share a worker pod (one node)"
        total += group["replicas"] * pod_gpus
    assert total == replicas * towers


def test_gpu_pods_request_equals_limit(case):
    for where, pod in pod_specs_of(case):
        for container in containers(pod):
            resources = container.get("resources", {})
            assert resources.get("requests") and resources.get("limits"), f"{where}: no resources"
            assert resources["requests"] == resources["limits"], f"{where}: requests != limits"


def pod_specs_of(case):
    for obj in case.objects:
        yield from pod_specs(obj)


def test_entrypoint_carries_the_overrides(case):
    values = chart_values(case)
    training = values["training"]
    assert not case.of_kind("RayCluster" if values["mode"] == "rayjob" else "RayJob")
    # RayCluster users submit the same entrypoint themselves; NOTES.txt prints it.
    overrides = entrypoint_overrides(case)
    assert overrides["parallel.towers"] == str(training["towers"])
    assert overrides["parallel.replicas"] == str(training["replicas"])
    assert overrides["data.root"] == training["dataRoot"]
    assert overrides["storage.path"] == training["storagePath"]
    assert overrides["storage.path"].startswith("s3://")
    assert overrides["run.name"] == (training["runName"] or RELEASE)
    assert overrides["train.batch_size"] == str(training["batchSize"])
    for extra in training["extraOverrides"]:
        key, value = extra.split("=", 1)
        assert overrides[key] == value
    if values["mlflow"]["enabled"]:
        service = next(s for s in case.of_kind("Service")
                       if s["metadata"]["labels"]["app.kubernetes.io/component"] == "mlflow")
        port = service["spec"]["ports"][0]["port"]
        assert overrides["tracking.uri"] == (
            f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port}")
    else:
        assert overrides["tracking.uri"] == values["tracking"]["externalUri"]
    if values["minio"]["enabled"]:
        assert overrides["data.s3_endpoint"].startswith("http://") and "-minio." in overrides[
            "data.s3_endpoint"]


def test_entrypoint_composes_with_the_service_config(case):
    """The overrides the chart builds are accepted by the real Hydra config of service/."""
    from service import hydra_app

    values = chart_values(case)
    config = hydra_app.compose([f"{key}={value}" for key, value in entrypoint_overrides(case).items()])
    training = values["training"]
    assert (config.parallel.towers, config.parallel.replicas) == (training["towers"], training["replicas"])
    assert config.parallel.allow_cross_node_towers is training["allowCrossNodeTowers"]
    assert config.parallel.grad_compression == training["gradCompression"]
    assert config.train.compile is training["compile"]
    assert config.data.root == training["dataRoot"]
    assert config.data.decode_concurrency == training["decodeConcurrency"]
    assert config.data.s3_max_attempts == values["s3"]["maxAttempts"]
    assert config.cluster.cpus_per_worker == training["cpusPerWorker"]
    assert config.storage.path == training["storagePath"]
    assert config.run.name == (training["runName"] or RELEASE)
    assert config.run.resume == training["resume"]
    assert config.cluster.name == training["cluster"]
    assert config.cluster.use_gpu is (training["cluster"] == "gpu")
    assert config.model.name == training["model"]


def test_rayjob_lifecycle(case):
    values = chart_values(case)
    if values["mode"] != "rayjob":
        pytest.skip("RayCluster mode")
    spec = case.one("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is values["rayJob"]["shutdownAfterJobFinishes"]
    assert spec["ttlSecondsAfterFinished"] == values["rayJob"]["ttlSecondsAfterFinished"]
    assert spec["backoffLimit"] == values["rayJob"]["backoffLimit"]
    assert spec["suspend"] is values["rayJob"]["suspend"]
    assert spec["submitterConfig"]["backoffLimit"] == values["rayJob"]["submitterBackoffLimit"]


def test_ray_token_auth_everywhere(case):
    values = chart_values(case)
    secret = values["secrets"]["rayAuth"]["existingSecret"]
    spec = ray_cluster_spec(case)
    assert spec["authOptions"] == {"mode": "token", "secretName": secret}
    ray_pods = [(w, p) for w, p in pod_specs_of(case) if w.startswith(("RayJob", "RayCluster"))]
    assert ray_pods
    for where, pod in ray_pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": secret, "key": "auth_token"}, where
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0", where


def test_no_plaintext_secrets(case):
    assert not case.of_kind("Secret"), "the chart must reference Secrets, never create them"
    assert not URL_WITH_PASSWORD.search(case.text), "a URL with an inline password was rendered"
    for where, pod in pod_specs_of(case):
        for container in containers(pod):
            for env in container.get("env", []):
                if not SECRET_ENV.search(env["name"]):
                    continue
                if env["name"] == "MLFLOW_BACKEND_STORE_URI" and "value" in env:
                    # Bundled Postgres: password-less DSN, the password comes via PGPASSWORD.
                    assert "@" in env["value"] and not URL_WITH_PASSWORD.search(env["value"])
                    continue
                assert "value" not in env, f"{where}: {env['name']} has a plaintext value"
                assert "secretKeyRef" in env["valueFrom"], f"{where}: {env['name']} not from a Secret"
            assert not container.get("envFrom"), f"{where}: envFrom hides what is injected"


def test_pod_security(case):
    seen = 0
    for where, pod in pod_specs_of(case):
        seen += 1
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["securityContext"].get("runAsUser", 1) != 0, where
        assert spec.get("automountServiceAccountToken") is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for container in containers(pod):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"]["drop"] == ["ALL"], where
            worker = chart_values(case)["ray"]["worker"]
            wants_ipc_lock = where.endswith(f"worker {worker['groupName']}") and worker["ipcLock"]
            assert ctx["capabilities"].get("add", []) == (["IPC_LOCK"] if wants_ipc_lock else []), where
            assert ctx["runAsNonRoot"] is True and not ctx.get("privileged"), where
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert not any("hostPort" in port for port in container.get("ports", [])), where
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    assert seen >= 3


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies_cover_every_server(case):
    policies = case.of_kind("NetworkPolicy")
    assert policies
    release_only = {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}}
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule open to everyone"
            for peer in rule["from"]:
                if peer == release_only:
                    continue
                # Anything but the release's own pods is limited to named ports.
                assert rule.get("ports"), f"{policy['metadata']['name']}: {peer} on all ports"
                assert peer.get("namespaceSelector") is not None or peer.get("podSelector")
    servers = {"ray-head", "ray-worker", "mlflow", "postgres", "minio"}
    for where, pod in pod_specs_of(case):
        labels = pod["metadata"]["labels"]
        if labels.get("app.kubernetes.io/component") not in servers:
            continue
        assert any(_selects(p["spec"]["podSelector"], labels) for p in policies), \
            f"{where} is not covered by a NetworkPolicy"
    head = next(p for p in policies if p["metadata"]["name"].endswith("-ray-head"))
    operator_rules = [r for r in head["spec"]["ingress"] if r["from"][0] != release_only]
    for rule in operator_rules:
        assert {port["port"] for port in rule["ports"]} <= {8265, 10001}, \
            "outsiders may reach only the dashboard and client ports, never the GCS (6379)"


def test_no_external_exposure(case):
    assert not case.of_kind("Ingress") and not case.of_kind("Route")
    for service in case.of_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    spec = ray_cluster_spec(case)
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress")


def test_mlflow_server(case):
    values = chart_values(case)
    if not values["mlflow"]["enabled"]:
        assert not case.of_kind("Deployment")
        return
    deployment = next(d for d in case.of_kind("Deployment")
                      if d["metadata"]["name"].endswith("-mlflow"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    assert "--app-name basic-auth" in script and "--serve-artifacts" in script
    assert f"--artifacts-destination '{values['mlflow']['artifactsDestination']}'" in script
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == \
        values["mlflow"]["auth"]["existingSecret"]
    if values["postgresql"]["enabled"]:
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == \
            values["postgresql"]["auth"]["existingSecret"]
        assert case.of_kind("StatefulSet")
    else:
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == \
            values["mlflow"]["database"]["existingSecret"]


def test_optional_components_follow_their_switches(case):
    values = chart_values(case)
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in case.objects}
    full = f"{RELEASE}-alexnet"
    assert (("StatefulSet", f"{full}-postgres") in names) == values["postgresql"]["enabled"]
    assert (("StatefulSet", f"{full}-minio") in names) == values["minio"]["enabled"]
    assert (("Job", f"{full}-ingest") in names) == values["ingest"]["enabled"]
    if values["ingest"]["enabled"]:
        job = case.one("Job") if not values["minio"]["enabled"] else next(
            j for j in case.of_kind("Job") if j["metadata"]["name"].endswith("-ingest"))
        command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[:3] == ["python", "-m", "service.ingest"]
        assert f"source={values['ingest']['source']}" in command
        assert f"dest={values['ingest']['dest'] or values['training']['dataRoot']}" in command


# ---------- bad values fail at render time, with a message that says why ----------

BAD_VALUES = [
    pytest.param({"training": {"towers": 4}, "ray": {"worker": {"gpusPerPod": 2}}},
                 "gpusPerPod=2 is not a multiple of training.towers=4", id="towers-not-dividing-gpus"),
    pytest.param({"training": {"towers": 2, "replicas": 1}, "ray": {"worker": {"gpusPerPod": 4}}},
                 "does not fill worker pods", id="world-not-filling-pods"),
    pytest.param({"training": {"replicas": 0}}, "/training/replicas", id="zero-replicas"),
    pytest.param({"training": {"towers": 3}}, "/training/towers", id="towers-3"),
    pytest.param({"secrets": {"s3": {"existingSecret": ""}}}, "secrets.s3.existingSecret is required",
                 id="missing-s3-secret"),
    pytest.param({"secrets": {"rayAuth": {"existingSecret": ""}}},
                 "secrets.rayAuth.existingSecret is required", id="missing-ray-auth-secret"),
    pytest.param({"mlflow": {"auth": {"existingSecret": ""}}}, "mlflow.auth.existingSecret is required",
                 id="missing-mlflow-auth-secret"),
    pytest.param({"mlflow": {"database": {"existingSecret": ""}}},
                 "mlflow.database.existingSecret is required", id="missing-mlflow-db-secret"),
    pytest.param({"postgresql": {"enabled": True}}, "postgresql.auth.existingSecret is required",
                 id="missing-postgres-secret"),
    pytest.param({"training": {"storagePath": "/mnt/checkpoints"}}, "must be an s3:// URI",
                 id="local-checkpoints"),
    pytest.param({"training": {"dataRoot": ""}}, "training.dataRoot is required", id="missing-data-root"),
    pytest.param({"mode": "raycluster2"}, "/mode", id="bad-mode"),
    pytest.param({"image": {"tag": "latest"}}, "/image/tag", id="latest-tag"),
    pytest.param({"training": {"replicas": 3, "batchSize": 128}, "ray": {"worker": {"gpusPerPod": 2}}},
                 "does not divide over training.replicas=3", id="batch-not-dividing"),
    pytest.param({"ingest": {"enabled": True}}, "ingest.source is required", id="ingest-without-source"),
    pytest.param({"mlflow": {"enabled": False}}, "tracking.externalUri is required",
                 id="no-tracking-uri"),
    pytest.param({"secrets": {"s3": {"existingSecret": "Has_Caps"}}}, "/secrets/s3/existingSecret",
                 id="invalid-secret-name"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES)
def test_bad_values_fail_at_render(render_failure, override, message):
    assert message in render_failure(override)


def test_chart_defaults_alone_refuse_to_render(chart, helm):
    """Without the secret names and S3 locations the chart stops and names the first missing one."""
    with pytest.raises(helm.HelmRenderError, match="is required|must be an s3:// URI"):
        chart.render({}, name=RELEASE, namespace=NAMESPACE)
