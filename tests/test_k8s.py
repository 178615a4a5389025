"""The Kubernetes manifests of deploy/k8s, proved without a cluster: every overlay rendered with
`kubectl kustomize`, every rendered object validated against the Kubernetes 1.32 schemas (strict:
an unknown field fails) with kubernetes-validate, the custom resources it has no schema for
(ServiceMonitor, KServe's InferenceService) checked field by field, and the contract with the service
(probes, drain, user, settings) checked against the code."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings
from app.process.server import GRACEFUL_SHUTDOWN_SECONDS

from .conftest import ROOT

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the dev extra brings kubernetes-validate")

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"
IMAGE_UID = 10001  # Dockerfile: USER 10001:10001
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("serving.kserve.io/v1beta1", "InferenceService")}
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def kustomize(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL
    result = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"one {kind}, found {len(found)}"
    return found[0]


def kserve() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return request.param, kustomize(K8S / "overlays" / request.param)


def test_every_overlay_renders_the_whole_set(rendered):
    _, objects = rendered
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(
        ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"]
    )


def test_every_rendered_object_is_valid_kubernetes_1_32(rendered):
    _, objects = rendered
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_is_strict_about_unknown_fields(rendered):
    """A guard on the guard: a misspelt field must fail, or the test above proves nothing."""
    _, objects = rendered
    deployment = yaml.safe_load(yaml.safe_dump(by_kind(objects, "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_probes_point_at_healthz_and_readyz(rendered):
    _, objects = rendered
    container = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8000}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 8000)


def test_the_container_runs_as_the_image_user_on_a_read_only_root(rendered):
    _, objects = rendered
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    context = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert context["runAsNonRoot"] is True and context["runAsUser"] == IMAGE_UID
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    # A read-only root still needs a writable /tmp (prometheus_client's multiprocess folder).
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_the_grace_period_covers_the_drain_and_the_graceful_shutdown(rendered):
    _, objects = rendered
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    drain = float(env_of(pod["containers"][0])["CNNSERVE_DRAIN_SECONDS"])
    assert drain > 0
    assert pod["terminationGracePeriodSeconds"] > drain + GRACEFUL_SHUTDOWN_SECONDS


def test_resources_are_requested_and_limited(rendered):
    _, objects = rendered
    resources = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])


def test_the_hpa_scales_on_the_queue_with_cpu_as_fall_back(rendered):
    _, objects = rendered
    hpa = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cnnserve"}
    first, second = hpa["spec"]["metrics"]
    assert first["type"] == "Pods" and first["pods"]["metric"]["name"] == "cnnserve_queue_depth"
    assert second["type"] == "Resource" and second["resource"]["name"] == "cpu"
    assert "cnnserve_queue_depth" in (ROOT / "app" / "metrics.py").read_text(), "the metric the service exports"


def test_service_pdb_and_servicemonitor_select_the_pods(rendered):
    _, objects = rendered
    labels = by_kind(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = by_kind(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "protocol": "TCP", "targetPort": "http"}]
    pdb = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector and selector.items() <= labels.items()
    # ServiceMonitor: a CRD kubernetes-validate has no schema for, checked on the fields we rely on.
    monitor = by_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"


def test_the_overlays_pick_their_image_and_the_gpu_one_asks_for_a_gpu(rendered):
    overlay, objects = rendered
    container = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"cnnserve:{overlay}"
    env = env_of(container)
    assert env["CNNSERVE_HOST"] == "0.0.0.0"
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["CNNSERVE_PROVIDERS"] == "cuda"
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert env.get("CNNSERVE_PROVIDERS", "cpu") in ("cpu", "auto")


def manifest_env_names() -> set[str]:
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("name"), str) and node["name"].startswith("CNNSERVE_"):
                names.add(node["name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted(K8S.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            walk(document)
    return names


def test_every_cnnserve_variable_in_the_manifests_is_a_setting():
    settings = {
        f"CNNSERVE_{name.upper()}" for name, field in Settings.model_fields.items() if field.validation_alias is None
    }
    names = manifest_env_names()
    assert {"CNNSERVE_HOST", "CNNSERVE_DRAIN_SECONDS", "CNNSERVE_PROVIDERS"} <= names
    assert names <= settings, f"not settings: {sorted(names - settings)}"


@needs_kubectl
def test_the_models_volume_component_mounts_a_claim_read_only(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(K8S / "base", overlay)
    component = os.path.relpath(K8S / "components" / "models-volume", overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [base],
                "components": [component],
            }
        )
    )
    deployment = by_kind(kustomize(overlay), "Deployment")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    [mount] = [
        mount for mount in container["volumeMounts"] if mount["mountPath"] == env_of(container)["CNNSERVE_MODELS_DIR"]
    ]
    assert mount["readOnly"] is True
    [volume] = [volume for volume in pod["volumes"] if volume["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["readOnly"] is True


def test_the_kserve_predictor_runs_our_image_as_a_custom_container():
    """KServe's InferenceService is a CRD: checked on its structure, and its pod-level parts (the
    container, the volumes) against the Kubernetes 1.32 schemas, strictly."""
    isvc = kserve()
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    [container] = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"].startswith("cnnserve:")
    assert container["ports"] == [{"containerPort": 8000, "protocol": "TCP"}]
    env = env_of(container)
    assert env["CNNSERVE_HOST"] == "0.0.0.0" and env["CNNSERVE_PORT"] == "8000"
    # The V2 (Open Inference) health endpoints, which the service serves without authentication.
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    access = (ROOT / "app" / "http" / "middleware" / "access.py").read_text()
    assert '"/v2/health/live"' in access and '"/v2/health/ready"' in access
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert predictor["securityContext"]["runAsUser"] == IMAGE_UID
    drain = float(env["CNNSERVE_DRAIN_SECONDS"])
    assert predictor["terminationGracePeriodSeconds"] > drain + GRACEFUL_SHUTDOWN_SECONDS
    # The predictor is a pod spec plus KServe's own fields: validate it as a Pod's spec.
    kserve_fields = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency", "timeout"}
    pod_spec = {key: value for key, value in predictor.items() if key not in kserve_fields}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cnnserve"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
