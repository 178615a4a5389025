"""The Kubernetes manifests of deploy/k8s, proved without a cluster: every overlay rendered with
`kubectl kustomize`, every rendered object validated against the Kubernetes 1.32 schemas (strict:
an unknown field fails) with kubernetes-validate, the ServiceMonitor checked field by field, KServe's
InferenceService read strictly into the KServe SDK's own models, checkov over the rendered manifests,
the KServe predictor's pod, the Dockerfile and docker-compose.yml, and the contract with the service
(probes, drain, user, settings) checked against the code."""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import importlib.util
import json
import os
import random
import re
import shutil
import string
import subprocess
import sys
import types
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from app import tracing
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
        [
            "Namespace",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "ServiceMonitor",
        ]
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
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 8000)


def test_the_container_ports_are_the_ports_the_service_is_told_to_listen_on(rendered):
    """HTTP and gRPC (the Open Inference Protocol) on the ports CNNSERVE_PORT and CNNSERVE_GRPC_PORT
    name, gRPC on the settings' default (Triton's 8001) so that the image and the manifests agree."""
    _, objects = rendered
    container = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": int(env["CNNSERVE_PORT"]), "grpc": int(env["CNNSERVE_GRPC_PORT"])}
    assert ports["grpc"] == Settings.model_fields["grpc_port"].default == 8001
    assert {port["protocol"] for port in container["ports"]} == {"TCP"}


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
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "protocol": "TCP", "targetPort": "http"},
        {"name": "grpc", "port": 8001, "protocol": "TCP", "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"},
    ]
    container_ports = {
        port["name"]: port["containerPort"]
        for port in by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    for port in service["spec"]["ports"]:
        assert container_ports[port["targetPort"]] == port["port"], "the Service's port is the container's"
    pdb = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    policy = by_kind(objects, "NetworkPolicy")
    for selector in (
        service["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
        policy["spec"]["podSelector"]["matchLabels"],
    ):
        assert selector and selector.items() <= labels.items()
    # ServiceMonitor: a CRD kubernetes-validate has no schema for, checked on the fields we rely on.
    monitor = by_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"


def test_the_namespace_enforces_the_restricted_pod_security_standard(rendered):
    _, objects = rendered
    namespace = by_kind(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"], obj["kind"]


def test_the_network_policy_admits_the_service_ports_and_nothing_goes_out(rendered):
    _, objects = rendered
    policy = by_kind(objects, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}, {"port": "grpc", "protocol": "TCP"}]}]
    service_ports = [port["targetPort"] for port in by_kind(objects, "Service")["spec"]["ports"]]
    assert [port["port"] for port in policy["ingress"][0]["ports"]] == service_ports
    assert policy["egress"] == []


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


def with_component(overlay: Path, *components: str) -> list[dict[str, Any]]:
    """The cpu overlay with optional components added, rendered from a kustomization in `overlay`."""
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "cpu", overlay)],
                "components": [os.path.relpath(K8S / "components" / component, overlay) for component in components],
            }
        )
    )
    return kustomize(overlay)


@needs_kubectl
def test_the_models_volume_component_mounts_a_claim_read_only(tmp_path):
    deployment = by_kind(with_component(tmp_path / "overlay", "models-volume"), "Deployment")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    [mount] = [
        mount for mount in container["volumeMounts"] if mount["mountPath"] == env_of(container)["CNNSERVE_MODELS_DIR"]
    ]
    assert mount["readOnly"] is True
    [volume] = [volume for volume in pod["volumes"] if volume["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["readOnly"] is True


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The cpu overlay (with its ServiceMonitor) with access control and TLS."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return with_component(tmp_path_factory.mktemp("guarded") / "overlay", "access", "tls")


def secret_file(pod: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The Secret a file of the container's comes from, and the mount it comes through."""
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]["secretName"], mount


def test_the_access_and_tls_components_render_valid_kubernetes_1_32(guarded):
    for obj in guarded:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_access_component_reads_the_keys_file_from_a_secret_mounted_as_a_folder(guarded):
    """A folder, not a subPath: the kubelet swaps a Secret's folder on change and never updates a
    subPath mount, and the service reads the keys file again when it changes (rotation)."""
    pod = by_kind(guarded, "Deployment")["spec"]["template"]["spec"]
    secret, mount = secret_file(pod, env_of(pod["containers"][0])["CNNSERVE_KEYS_FILE"])
    assert secret == "cnnserve-access" and mount["readOnly"] is True and "subPath" not in mount


def test_the_tls_component_serves_its_secret_s_certificate_and_probes_over_https(guarded):
    pod = by_kind(guarded, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = env_of(container)
    settings = Settings(_env_file=None, tls_cert=env["CNNSERVE_TLS_CERT"], tls_key=env["CNNSERVE_TLS_KEY"])
    mounted = [secret_file(pod, str(path)) for path in (settings.tls_cert, settings.tls_key)]
    assert {secret for secret, _ in mounted} == {"cnnserve-tls"}
    assert not [mount for _, mount in mounted if "subPath" in mount], (
        "a renewal must reach the pod (app/process/tls.py)"
    )
    assert {
        container[probe]["httpGet"].get("scheme") for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    } == {"HTTPS"}


def test_with_access_and_tls_the_servicemonitor_scrapes_over_https_with_a_key(guarded):
    [endpoint] = by_kind(guarded, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "cnnserve-metrics", "key": "key"}}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return with_component(tmp_path_factory.mktemp("tracing") / "overlay", "tracing")


def test_the_tracing_component_renders_valid_kubernetes_1_32(traced):
    for obj in traced:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_tracing_component_sets_variables_the_service_turns_traces_on_with(traced, monkeypatch):
    """Its OTEL_* variables in this process's environment, where the service and the SDK read them:
    traces wanted, a tracer provider with the OTLP/gRPC exporter built (nothing is sent: no span is
    made), named cnnserve and sampling as the component says."""
    container = by_kind(traced, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {name: value for name, value in env_of(container).items() if name.startswith("OTEL_")}
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    assert not tracing.wanted(os.environ), "off without the component"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracing.wanted(os.environ)
    provider = tracing.provider_from(os.environ)
    try:
        assert provider.resource.attributes["service.name"] == "cnnserve"
        assert "TraceIdRatioBased{0.1}" in provider.sampler.get_description()
    finally:
        provider.shutdown()
    # $(NAME) in a value is expanded by the kubelet only from variables defined before it.
    names = [item["name"] for item in container["env"]]
    for position, item in enumerate(container["env"]):
        for reference in re.findall(r"\$\((\w+)\)", item.get("value", "")):
            assert reference in names[:position], f"{item['name']} refers to {reference}"


def test_the_tracing_component_lets_the_pods_reach_the_collector_and_dns_only(traced):
    container = by_kind(traced, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    endpoint = urllib.parse.urlsplit(env_of(container)["OTEL_EXPORTER_OTLP_ENDPOINT"])
    policy = by_kind(traced, "NetworkPolicy")["spec"]
    allowed = {(port["port"], port["protocol"]) for rule in policy["egress"] for port in rule["ports"]}
    assert allowed == {(endpoint.port, "TCP"), (53, "UDP"), (53, "TCP")}
    assert endpoint.port == 4317, "OTLP over gRPC: the service exports over nothing else"
    assert policy["ingress"] == by_kind(kustomize(K8S / "overlays" / "cpu"), "NetworkPolicy")["spec"]["ingress"]


# KServe's InferenceService, read into the KServe SDK's own models (kserve.models, generated from
# KServe's OpenAPI schema). Their deserializer drops unknown keys without a word (ApiClient reads only
# the fields a model declares), so the reading below walks the SDK's declared fields itself and fails
# on any other; the Kubernetes types the SDK borrows (V1Container, V1ObjectMeta...) are checked
# against the Kubernetes 1.32 schemas, strictly; and the object the SDK serializes back must equal
# the document, so nothing was dropped or changed on the way.


@dataclass(frozen=True)
class KServeSDK:
    models: types.ModuleType
    constants: types.ModuleType
    api_client: types.ModuleType


class KServeSchemaError(ValueError):
    """A field KServe's schema (or the Kubernetes one it borrows) does not have, or of the wrong type."""


@pytest.fixture(scope="module")
def sdk() -> Iterator[KServeSDK]:
    """The SDK's models without kserve/__init__.py, which imports its model server (grpc, pandas,
    cloudevents...): `make install-dev` installs kserve with --no-deps, and the models need only six
    and urllib3. The stand-in package is removed afterwards."""
    spec = importlib.util.find_spec("kserve")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the KServe SDK is not installed (make install-dev installs it)")
    saved = {name: module for name, module in sys.modules.items() if name.partition(".")[0] == "kserve"}
    package = types.ModuleType("kserve")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["kserve"] = package
    try:
        modules = [
            importlib.import_module(f"kserve.{name}") for name in ("models", "constants.constants", "api_client")
        ]
        yield KServeSDK(*modules)
    finally:
        for name in [name for name in sys.modules if name.partition(".")[0] == "kserve"]:
            del sys.modules[name]
        sys.modules.update(saved)


@functools.cache
def kubernetes_definitions() -> dict[str, Any]:
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return json.loads((schemas / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json").read_text())


@functools.cache
def kubernetes_validator(type_name: str) -> jsonschema.Draft202012Validator:
    """The strict Kubernetes schema of a type the SDK names the way the kubernetes client does."""
    definitions = kubernetes_definitions()
    if type_name == "ResourceQuantity":
        key = "io.k8s.apimachinery.pkg.api.resource.Quantity"
    else:
        match = re.fullmatch(r"V(\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)", type_name)
        assert match, f"no Kubernetes type for {type_name}"
        found = [key for key in definitions["$defs"] if key.endswith(f".v{match[1]}.{match[2]}")]
        assert len(found) == 1, f"{type_name}: {found} in the Kubernetes {KUBERNETES_VERSION} schemas"
        [key] = found
    registry: Registry[Any] = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator({"$ref": f"{definitions['$id']}#/$defs/{key}"}, registry=registry)


PRIMITIVES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float), "bool": bool}


def from_document(sdk: KServeSDK, data: Any, type_name: str, path: str) -> Any:
    """`data` read as the SDK's `type_name`: a KServe model built field by field (its setters check
    what the SDK checks), a Kubernetes type validated and kept as it is, an unknown key an error."""
    if type_name.startswith("list["):
        if not isinstance(data, list):
            raise KServeSchemaError(f"{path}: a list expected")
        return [from_document(sdk, item, type_name[5:-1], f"{path}[{i}]") for i, item in enumerate(data)]
    if type_name.startswith("dict("):
        if not isinstance(data, dict):
            raise KServeSchemaError(f"{path}: a mapping expected")
        value_type = type_name[5:-1].split(", ", 1)[1]
        return {key: from_document(sdk, value, value_type, f"{path}.{key}") for key, value in data.items()}
    if type_name == "object":
        return data
    if type_name in PRIMITIVES:
        if not isinstance(data, PRIMITIVES[type_name]) or (isinstance(data, bool) and type_name != "bool"):
            raise KServeSchemaError(f"{path}: {type_name} expected, got {data!r}")
        return data
    model = getattr(sdk.models, type_name, None)
    if model is None:
        error = jsonschema.exceptions.best_match(kubernetes_validator(type_name).iter_errors(data))
        if error is not None:
            raise KServeSchemaError(f"{path}: {error.message} (Kubernetes {KUBERNETES_VERSION}, {type_name})")
        return data
    if not isinstance(data, dict):
        raise KServeSchemaError(f"{path}: a mapping expected for {type_name}")
    fields = {key: attribute for attribute, key in model.attribute_map.items()}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise KServeSchemaError(f"{path}: {unknown} not in KServe's {type_name}")
    values = {
        fields[key]: from_document(sdk, value, model.openapi_types[fields[key]], f"{path}.{key}")
        for key, value in data.items()
    }
    return model(**values)


def read_inference_service(sdk: KServeSDK, document: dict[str, Any]) -> Any:
    return from_document(sdk, document, "V1beta1InferenceService", "InferenceService")


def kserve_pod(sdk: KServeSDK) -> dict[str, Any]:
    """The pod KServe makes of the predictor: the predictor's fields less KServe's own (replicas,
    scaling, timeout...), with the InferenceService's metadata (and so its checkov annotations)."""
    isvc = kserve()
    pod_fields = set(kubernetes_definitions()["$defs"]["io.k8s.api.core.v1.PodSpec"]["properties"])
    kserve_fields = set(sdk.models.V1beta1PredictorSpec.attribute_map.values()) - pod_fields
    spec = {key: value for key, value in isvc["spec"]["predictor"].items() if key not in kserve_fields}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": isvc["metadata"], "spec": spec}


def test_the_inference_service_reads_strictly_into_the_kserve_sdk_and_back_unchanged(sdk):
    document = kserve()
    isvc = read_inference_service(sdk, document)
    assert isinstance(isvc, sdk.models.V1beta1InferenceService)
    group, kind = sdk.constants.KSERVE_GROUP, sdk.constants.KSERVE_KIND_INFERENCESERVICE
    assert (isvc.api_version, isvc.kind) == (f"{group}/{sdk.constants.KSERVE_V1BETA1_VERSION}", kind)
    assert isinstance(isvc.spec.predictor, sdk.models.V1beta1PredictorSpec)
    assert sdk.api_client.ApiClient().sanitize_for_serialization(isvc) == document


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        (("spec", "predictor"), "minReplica", 1, "'minReplica'] not in KServe's V1beta1PredictorSpec"),
        (("spec", "predictor"), "minReplicas", "one", "minReplicas: int expected"),
        (("spec",), "predictors", {}, "'predictors'] not in KServe's V1beta1InferenceServiceSpec"),
        (("spec", "predictor", "containers", 0), "readinessProbes", {}, "'readinessProbes' was unexpected"),
        (("spec", "predictor", "containers", 0), "ports", [{"containerPort": "8000"}], "'8000' is not of type"),
    ],
    ids=[
        "kserve-field-misspelt",
        "kserve-field-mistyped",
        "kserve-component-misspelt",
        "k8s-field-misspelt",
        "k8s-field-mistyped",
    ],
)
def test_the_kserve_reading_fails_on_what_the_schema_lacks(sdk, where, key, value, message):
    """A guard on the guard: without these failures the test above would prove nothing."""
    document = kserve()
    node = document
    for step in where:
        node = node[step]
    node[key] = value
    with pytest.raises(KServeSchemaError, match=re.escape(message)):
        read_inference_service(sdk, document)


def test_the_kserve_predictor_is_our_image_as_a_custom_container_speaking_v2(sdk):
    predictor = read_inference_service(sdk, kserve()).spec.predictor
    # Custom: none of KServe's runtimes (sklearn, onnx, triton, model...), batcher or logger is set.
    model_fields = [name for name, type_name in predictor.openapi_types.items() if hasattr(sdk.models, type_name)]
    assert {name for name in model_fields if getattr(predictor, name) is not None} == set()
    [container] = predictor.containers
    assert container["name"] == "kserve-container"  # KServe's name for the container it serves from
    assert container["image"] == "cnnserve:cpu"  # Dockerfile: --target cpu
    env = env_of(container)
    assert env["PROTOCOL"] == sdk.constants.PredictorProtocol.REST_V2.value
    # KServe serves the first port as REST (its Service's port 80, its ingress); a further port named
    # for gRPC gets a Service port of its own and appProtocol kubernetes.io/h2c (Standard mode).
    assert container["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 8001, "protocol": "TCP"},
    ]
    assert env["CNNSERVE_HOST"] == "0.0.0.0" and env["CNNSERVE_PORT"] == "8000"
    assert env["CNNSERVE_GRPC_PORT"] == "8001"
    # The V2 (Open Inference) health endpoints, which the service serves without authentication.
    for probe, path in (("startupProbe", "live"), ("livenessProbe", "live"), ("readinessProbe", "ready")):
        assert container[probe]["httpGet"] == {"path": f"/v2/health/{path}", "port": 8000}
    access = (ROOT / "app" / "http" / "middleware" / "access.py").read_text()
    assert '"/v2/health/live"' in access and '"/v2/health/ready"' in access
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert predictor.security_context["runAsUser"] == IMAGE_UID
    assert predictor.automount_service_account_token is False
    drain = float(env["CNNSERVE_DRAIN_SECONDS"])
    assert predictor.termination_grace_period_seconds > drain + GRACEFUL_SHUTDOWN_SECONDS


def test_the_kserve_predictor_pod_is_valid_kubernetes_1_32(sdk):
    """The predictor's pod fields validated as one Pod, strictly (the per-type reading above cannot see
    a rule across fields, e.g. a volume mount naming no volume's name)."""
    pod = kserve_pod(sdk)
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    mounts = {mount["name"] for container in pod["spec"]["containers"] for mount in container["volumeMounts"]}
    assert mounts <= {volume["name"] for volume in pod["spec"]["volumes"]}


# checkov, pinned (Makefile: CHECKOV_VERSION, in a venv of its own), over what we ship: each overlay
# rendered, the pod KServe makes of the predictor (checkov has no checks for the InferenceService
# kind itself), the Dockerfile, and docker-compose.yml (checkov has no Compose framework: its secrets
# scan is what applies). Every skip is justified where it is made, and a canary of known faults,
# scanned in the same run, proves each framework is live.

CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
CHECKOV_VERSION = "3.3.30"
CHECKOV_SKIPS = {"CKV_K8S_43", "CKV_K8S_15", "CKV2_K8S_6", "CKV_DOCKER_7"}


def fake_aws_keys() -> dict[str, str]:
    """Credentials of AWS's shape, made here so no such string is in the repository."""
    draw = random.Random(0).choices
    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + "".join(draw(string.ascii_uppercase + string.digits, k=16)),
        "AWS_SECRET_ACCESS_KEY": "".join(draw(string.ascii_letters + string.digits, k=40)),
    }


def write_canary(folder: Path) -> None:
    folder.mkdir()
    deployment = by_kind(kustomize(K8S / "overlays" / "cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    (folder / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    (folder / "Dockerfile").write_text('FROM python:latest\nUSER 10001\nCMD ["python"]\n')
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose["services"]["cnnserve-cpu"]["environment"] = fake_aws_keys()
    (folder / "docker-compose.yml").write_text(yaml.safe_dump(compose))


@pytest.fixture(scope="module")
def checkov(tmp_path_factory: pytest.TempPathFactory, sdk: KServeSDK) -> dict[str, list[dict[str, Any]]]:
    """One checkov run over ours/ (what we ship) and canary/: its checks by outcome."""
    if not CHECKOV.exists() or KUBECTL is None:
        pytest.skip("checkov (make install-dev installs it into .venv-checkov) or kubectl is missing")
    root = tmp_path_factory.mktemp("checkov")
    ours = root / "ours"
    ours.mkdir()
    for overlay in OVERLAYS:
        (ours / f"{overlay}.yaml").write_text(yaml.safe_dump_all(kustomize(K8S / "overlays" / overlay)))
    traced = with_component(tmp_path_factory.mktemp("tracing") / "overlay", "tracing")
    (ours / "cpu-tracing.yaml").write_text(yaml.safe_dump_all(traced))
    guarded = with_component(tmp_path_factory.mktemp("guarded") / "overlay", "access", "tls")
    (ours / "cpu-access-tls.yaml").write_text(yaml.safe_dump_all(guarded))
    (ours / "kserve-predictor-pod.yaml").write_text(yaml.safe_dump(kserve_pod(sdk)))
    for name in ("Dockerfile", "docker-compose.yml"):
        shutil.copy(ROOT / name, ours / name)
    write_canary(root / "canary")
    frameworks = ["--framework", "kubernetes", "dockerfile", "secrets"]
    command = [str(CHECKOV), "--directory", str(root), *frameworks, "--skip-download", "--output", "json"]
    env = {**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"}  # and --skip-download: no network
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert result.returncode in (0, 1), result.stderr  # 1: failed checks (the canary's)
    reports = json.loads(result.stdout)
    assert {report["summary"]["checkov_version"] for report in reports} == {CHECKOV_VERSION}
    return {
        outcome: [check for report in reports for check in report["results"][f"{outcome}_checks"]]
        for outcome in ("passed", "failed", "skipped")
    }


def test_checkov_fails_no_check_on_what_we_ship(checkov):
    failed = [check for check in checkov["failed"] if check["file_path"].startswith("/ours/")]
    assert not failed, "\n".join(f"{c['check_id']} {c['check_name']}: {c['file_path']}" for c in failed)
    scanned = {check["file_path"] for check in checkov["passed"]}
    assert {
        "/ours/cpu.yaml",
        "/ours/gpu.yaml",
        "/ours/cpu-tracing.yaml",
        "/ours/kserve-predictor-pod.yaml",
        "/ours/Dockerfile",
    } <= scanned


def test_every_checkov_skip_is_justified_in_place(checkov):
    skipped = [check for check in checkov["skipped"] if check["file_path"].startswith("/ours/")]
    assert {check["check_id"] for check in skipped} == CHECKOV_SKIPS
    for check in skipped:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason.split()) >= 10, f"{check['check_id']} in {check['file_path']}: {reason!r}"


def test_checkov_catches_a_privileged_pod_a_latest_base_and_a_key_in_compose(checkov):
    failed = {(check["file_path"], check["check_id"]) for check in checkov["failed"]}
    assert ("/canary/deployment.yaml", "CKV_K8S_16") in failed  # container should not be privileged
    assert ("/canary/Dockerfile", "CKV_DOCKER_7") in failed  # base image tag latest
    assert ("/canary/docker-compose.yml", "CKV_SECRET_2") in failed  # AWS access key
