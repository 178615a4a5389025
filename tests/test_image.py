"""The cpu image, built and proven: built once for the module from the Dockerfile as it is
(deploy/image.sh: docker or podman, on a stand-in base where no registry answers), run as production
would (read-only, a tmpfs /tmp, uid 10001, every capability dropped), sent real photos over HTTP and
gRPC, stopped with requests in flight, looked into; its lock files checked against pyproject.toml;
docker-compose.yml checked against the Compose Specification's schema and its cpu profile brought
up and down.

Tests that need an engine are skipped, with the reason, only where neither a docker daemon nor
podman is there (`make tools` installs podman); every container is removed in its fixture's
teardown, running or not.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import jsonschema
import pytest
import tritonclient.grpc as triton_grpc
import trustme
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from .app.access_helpers import entry, new_key, write_atomically
from .conftest import MODELS, ROOT, free_port

IMAGE_SH = ROOT / "deploy" / "image.sh"
REQUIREMENTS = ROOT / "requirements"
# What the image adds above its base (the venv, the models, the SBOM): 330 MB measured on Debian
# bookworm's Python 3.11 (December 2026), of which ONNX Runtime 80 MB, numpy 74 MB, onnx 32 MB and
# models/ 33 MB. The budget leaves 10% for growth: more is a package or a model too many.
SIZE_BUDGET_MB = 365
READY_WITHIN_S = 30.0
GRACE_S = 30  # podman stop --time: SIGTERM, then SIGKILL after this (compose's stop_grace_period is 45 s)
API_KEY = "image-test-key"
# Settings given with -e to the production container, each visible from outside (tests below).
SETTINGS = {
    "CNNSERVE_PROCESSES": "1",
    "CNNSERVE_INTRA_OP_THREADS": "1",
    "CNNSERVE_MAX_BATCH_SIZE": "4",
    "CNNSERVE_MAX_QUEUE": "16",
    "CNNSERVE_MAX_TOP_K": "7",
    "CNNSERVE_API_KEY": API_KEY,
    "CNNSERVE_CORS_ORIGINS": "https://page.example",
}
PRODUCTION = [
    "--read-only",
    "--tmpfs",
    "/tmp",
    "--user",
    "10001:10001",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
]


def engine_command() -> list[str]:
    found = subprocess.run(["bash", str(IMAGE_SH), "engine"], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(f"no container engine here ({found.stderr.strip()})")
    return found.stdout.split()


def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


@dataclass
class Built:
    engine: list[str]
    tag: str
    base: str
    build_log: str
    run_options: list[str] = field(default_factory=list)

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.engine, *args, timeout=timeout, check=check)

    def size_mb(self, image: str) -> float:
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout) / 1e6


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Built:
    """cnnserve:cpu, built once per session (the engine's cache makes a rebuild of unchanged files
    take seconds); the base, build time and size are printed."""
    engine = engine_command()
    started = time.monotonic()
    built = subprocess.run(
        ["bash", str(IMAGE_SH), "build", "cpu"], capture_output=True, text=True, timeout=1200, cwd=ROOT
    )
    assert built.returncode == 0, built.stderr[-5000:]
    tag = built.stdout.strip().splitlines()[-1]
    base = re.search(r" on (\S+)$", built.stderr, re.MULTILINE)
    assert base, built.stderr[-2000:]
    options = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"] if engine[0] == "podman" else []
    result = Built(engine, tag, base[1], built.stderr, options)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        said = [line for line in built.stderr.splitlines() if line.startswith(("base:", "built ", "size:"))]
        reporter.write_line("")
        for line in [*said, f"(image fixture: {time.monotonic() - started:.0f} s)"]:
            reporter.write_line(f"image: {line}")
    return result


@dataclass
class Container:
    built: Built
    name: str
    http: str
    grpc: str
    ready_after: float = 0.0

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.built("exec", self.name, *args, check=check)

    def logs(self) -> str:
        logs = self.built("logs", self.name, check=False)
        return logs.stdout + logs.stderr


def get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 10, context: ssl.SSLContext | None = None
) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def post_image(url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "image/png", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@contextmanager
def container(
    built: Built, *options: str, env: dict[str, str] | None = None, tls: ssl.SSLContext | None = None
) -> Iterator[Container]:
    """A container of the image with ``options``, HTTP (HTTPS, verified with ``tls``, when it
    serves TLS) and gRPC published on free loopback ports, ready (/readyz 200) when yielded;
    removed afterwards, whatever happened."""
    name = f"cnnserve-test-{os.getpid()}-{free_port()}"
    http, grpc_port = free_port(), free_port()
    environment = [f"--env={key}={value}" for key, value in (env or {}).items()]
    started = time.monotonic()
    built(
        "run",
        "--detach",
        "--name",
        name,
        *built.run_options,
        "--publish",
        f"127.0.0.1:{http}:8000",
        "--publish",
        f"127.0.0.1:{grpc_port}:8001",
        *environment,
        *options,
        built.tag,
    )
    box = Container(built, name, f"{'https' if tls else 'http'}://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}")
    try:
        deadline = started + 120
        while not ready(box.http, context=tls):
            state = built("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", f"the container is {state}:\n{box.logs()[-3000:]}"
            assert time.monotonic() < deadline, f"never ready:\n{box.logs()[-3000:]}"
            time.sleep(0.2)
        box.ready_after = time.monotonic() - started
        yield box
    finally:
        built("rm", "--force", name, check=False)


def ready(url: str, in_a_row: int = 10, context: ssl.SSLContext | None = None) -> bool:
    """/readyz 200 ``in_a_row`` times on fresh connections: the kernel spreads connections over the
    server processes (two by default on two cores), and the first 200 may come from the first up."""
    return all(get_status(f"{url}/readyz", context) == 200 for _ in range(in_a_row))


def get_status(url: str, context: ssl.SSLContext | None = None) -> int:
    try:
        return get(url, timeout=2, context=context)[0]
    except OSError:
        return 0


@pytest.fixture(scope="module")
def production(image: Built) -> Iterator[Container]:
    """The image as production runs it, with SETTINGS given by -e."""
    with container(image, *PRODUCTION, env=SETTINGS) as box:
        yield box


AUTH = {"authorization": f"Bearer {API_KEY}"}  # lower case: gRPC metadata keys must be


# -- run as production would ---------------------------------------------------------------


def test_the_container_is_ready_within_30_s(production):
    print(f"/readyz 200 {production.ready_after:.1f} s after {production.built.engine[0]} run")
    assert production.ready_after < READY_WITHIN_S, f"/readyz 200 after {production.ready_after:.1f} s"


def test_it_runs_as_uid_10001_on_a_read_only_root_with_no_capabilities(production):
    assert production.exec("id", "-u").stdout.strip() == "10001"
    status = production.exec("cat", "/proc/1/status").stdout
    capabilities = dict(re.findall(r"^(Cap\w+):\s+(\w+)$", status, re.MULTILINE))
    assert set(capabilities.values()) == {"0000000000000000"}, capabilities
    assert production.exec("touch", "/srv/models/x", check=False).returncode != 0, "the root must be read-only"
    assert production.exec("touch", "/tmp/x", check=False).returncode == 0, "/tmp must be writable (tmpfs)"


@pytest.mark.parametrize("photo", ["chelsea", "coffee"])
def test_classify_answers_a_real_photo_as_the_native_service_does(production, client, photos, photo):
    body = photos[photo].read_bytes()
    status, answer = post_image(f"{production.http}/classify", body, AUTH)
    assert status == 200, answer
    native = client.post("/classify", content=body, headers={"content-type": "image/png"})
    assert native.status_code == 200
    ours, theirs = json.loads(answer), native.json()
    assert ours["model"] == theirs["model"] == "efficientnet_lite0"
    assert [p["index"] for p in ours["predictions"]] == [p["index"] for p in theirs["predictions"]]
    for mine, native_prediction in zip(ours["predictions"], theirs["predictions"], strict=True):
        assert mine["score"] == pytest.approx(native_prediction["score"], abs=1e-5)


def test_the_images_healthcheck_command_passes(production, image):
    config = json.loads(image("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image.tag).stdout)
    assert config["Test"][0] == "CMD", config
    assert production.exec(*config["Test"][1:], check=False).returncode == 0
    if image.engine[0] == "podman":
        assert image("healthcheck", "run", production.name, check=False).returncode == 0


def test_grpc_health_v1_answers_serving_on_8001_without_a_key(production):
    with grpc.insecure_channel(production.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_open_inference_protocol_answers_on_8001(production):
    client = triton_grpc.InferenceServerClient(production.grpc)
    try:
        assert client.is_server_ready(headers=AUTH)
        assert client.is_model_ready("efficientnet_lite0", headers=AUTH)
        metadata = client.get_model_metadata("lenet5", headers=AUTH, as_json=True)
        assert metadata["inputs"][0]["shape"] == ["-1", "1", "28", "28"]
    finally:
        client.close()


# -- settings given with -e ----------------------------------------------------------------


def test_the_api_key_given_with_e_guards_the_api_but_not_the_probes(production):
    assert get(f"{production.http}/models")[0] == 401
    assert get(f"{production.http}/models", AUTH)[0] == 200
    assert get(f"{production.http}/readyz")[0] == 200


def test_sizing_settings_given_with_e_reach_every_model(production):
    status, body, _ = get(f"{production.http}/models", AUTH)
    assert status == 200
    for model in json.loads(body)["models"]:
        serving = model["serving"]
        assert (serving["processes"], serving["threads"]) == (1, 1), model["name"]
        assert (serving["max_batch_size"], serving["max_queue"]) == (4, 16), model["name"]


def test_the_top_k_limit_given_with_e_is_enforced(production, photos):
    body = photos["chelsea"].read_bytes()
    assert post_image(f"{production.http}/classify?top_k=7", body, AUTH)[0] == 200
    assert post_image(f"{production.http}/classify?top_k=8", body, AUTH)[0] == 422


def test_the_cors_origin_given_with_e_is_allowed(production):
    origin = SETTINGS["CNNSERVE_CORS_ORIGINS"]
    _, _, headers = get(f"{production.http}/healthz", {"Origin": origin})
    assert {k.lower(): v for k, v in headers.items()}.get("access-control-allow-origin") == origin


def test_a_keys_file_and_a_certificate_mounted_read_only_serve_https_to_the_file_s_keys(image, tmp_path):
    """As docker-compose.yml runs it with deploy/secrets: a key of the file admitted, a key rotated
    in the host's file read again without a restart, HTTPS with the certificate, and the health
    check passing over it."""
    ca, folder = trustme.CA(), tmp_path / "secrets"
    folder.mkdir(mode=0o755)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    certificate = ca.issue_cert("127.0.0.1")
    certificate.cert_chain_pems[0].write_to_path(str(folder / "tls.crt"))
    certificate.private_key_pem.write_to_path(str(folder / "tls.key"))
    old, new = new_key("image"), new_key("image")
    (folder / "keys.toml").write_text(entry("image-old", old, ["read"]))
    for path in folder.iterdir():
        path.chmod(0o644)  # readable by the container's uid 10001
    inside = "/run/secrets/cnnserve"
    env = {
        "CNNSERVE_PROCESSES": "1",
        "CNNSERVE_KEYS_FILE": f"{inside}/keys.toml",
        "CNNSERVE_TLS_CERT": f"{inside}/tls.crt",
        "CNNSERVE_TLS_KEY": f"{inside}/tls.key",
    }
    verified = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with container(image, *PRODUCTION, "--volume", f"{folder}:{inside}:ro", env=env, tls=verified) as box:
        assert get(f"{box.http}/models", context=verified)[0] == 401
        assert get(f"{box.http}/models", {"X-API-Key": old}, context=verified)[0] == 200
        assert box.exec("cnnserve", "probe", "/readyz", check=False).returncode == 0
        write_atomically(folder / "keys.toml", entry("image-new", new, ["read"]))
        (folder / "keys.toml").chmod(0o644)
        deadline = time.monotonic() + 10
        while get(f"{box.http}/models", {"X-API-Key": new}, context=verified)[0] != 200:
            assert time.monotonic() < deadline, "the rotated key never worked"
            time.sleep(0.2)
        assert get(f"{box.http}/models", {"X-API-Key": old}, context=verified)[0] == 401


def test_models_mounted_read_only_from_the_host_replace_the_baked_in_ones(image, client, photos, tmp_path):
    """The compose layout: a host folder on /srv/models, read-only; here one holding only two models."""
    repository = tmp_path / "models"
    for name in ("lenet5", "kernels"):
        shutil.copytree(MODELS / name, repository / name)
    for path in [repository, *repository.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by uid 10001
    options = [*PRODUCTION, "--volume", f"{repository}:/srv/models:ro"]
    with container(image, *options, env={"CNNSERVE_DEFAULT_MODEL": "lenet5"}) as box:
        status, body, _ = get(f"{box.http}/models")
        assert status == 200
        listing = json.loads(body)
        assert listing["default_model"] == "lenet5"
        assert sorted(model["name"] for model in listing["models"]) == ["kernels", "lenet5"]
        photo = photos["rocket"].read_bytes()
        status, answer = post_image(f"{box.http}/classify", photo, {"content-type": "image/jpeg"})
        assert status == 200, answer
        native = client.post("/classify?model=lenet5", content=photo, headers={"content-type": "image/jpeg"})
        assert [p["index"] for p in json.loads(answer)["predictions"]] == [
            p["index"] for p in native.json()["predictions"]
        ]
        assert box.exec("touch", "/srv/models/x", check=False).returncode != 0


# -- stop as production would --------------------------------------------------------------


def big_jpeg(path: Path) -> bytes:
    """A 12-megapixel JPEG of a real photo: seconds of work for the 2-core machine, a few at once."""
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_sigterm_drains_then_finishes_what_is_in_flight_and_exits_0(image, photos):
    """/readyz turns 503 for CNNSERVE_DRAIN_SECONDS (5 in the image), the requests in flight all get
    200, and the container exits 0 well within the grace period."""
    body = big_jpeg(photos["chelsea"])
    occlusion = "/explain?method=occlusion&window=32&stride=16&format=json"  # 170 forward passes
    with container(image, *PRODUCTION) as box:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            in_flight = [
                pool.submit(post_image, f"{box.http}{path}", body, {"content-type": "image/jpeg"}, 120)
                for path in [occlusion] * 2 + ["/classify"] * 4
            ]
            time.sleep(1.0)
            assert not any(f.done() for f in in_flight[:2]), "the requests must still be in flight at SIGTERM"
            signalled = time.monotonic()
            stop = pool.submit(image, "stop", "--time", str(GRACE_S), box.name, timeout=GRACE_S + 30)
            readiness = []
            while not stop.done() and time.monotonic() - signalled < 4:
                readiness.append(get_status(f"{box.http}/readyz"))
                time.sleep(0.2)
            answers = [f.result() for f in in_flight]
            stop.result()
            stopped_after = time.monotonic() - signalled
        assert 503 in readiness, readiness
        assert [status for status, _ in answers] == [200] * len(answers), [a[1][:200] for a in answers]
        exit_code = image("inspect", "--format", "{{.State.ExitCode}}", box.name).stdout.strip()
        assert exit_code == "0", box.logs()[-3000:]
        assert stopped_after < GRACE_S, f"stopped after {stopped_after:.1f} s: killed, not drained"
        print(f"SIGTERM to exit: {stopped_after:.1f} s")


# -- what is inside --------------------------------------------------------------------------


def test_no_compilers_inside(production):
    found = production.exec("sh", "-c", "command -v gcc cc c++ g++ clang make ld as || true").stdout
    assert found.strip() == ""


def test_no_pip_and_no_pip_cache_inside(production):
    caches = production.exec("sh", "-c", "find / -xdev -type d -path '*/.cache/pip' 2>/dev/null || true").stdout
    assert caches.strip() == ""
    assert production.exec("python", "-c", "import pip", check=False).returncode != 0, "the runtime venv holds no pip"


def test_no_torch_and_no_tests_inside(production):
    assert production.exec("python", "-c", "import torch", check=False).returncode != 0
    ours = production.exec(
        "sh",
        "-c",
        "find / -xdev \\( -name test_deploy.py -o -name test_image.py -o -name torchless.py \\) 2>/dev/null || true",
    ).stdout
    assert ours.strip() == ""
    assert production.exec("test", "-e", "/src", check=False).returncode != 0, "the build stage's sources stay there"


def test_what_the_image_adds_above_its_base_is_under_budget(image):
    added = image.size_mb(image.tag) - image.size_mb(image.base)
    print(f"{image.tag}: {added:.0f} MB above {image.base}")
    assert added < SIZE_BUDGET_MB


def locked(name: str, python: str = "3.11") -> dict[str, str]:
    """A lock file's pins that apply on Linux with this Python: name -> version."""
    environment = {"python_full_version": f"{python}.0", "python_version": python, "sys_platform": "linux"}
    pins = {}
    for line in (REQUIREMENTS / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^\s;]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if match and (match[3] is None or Marker(match[3]).evaluate(environment)):
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_the_image_holds_exactly_the_locked_packages(production):
    listing = production.exec(
        "python",
        "-c",
        "import importlib.metadata as m, json; print(json.dumps({d.name: d.version for d in m.distributions()}))",
    ).stdout
    installed = {canonicalize_name(name): version for name, version in json.loads(listing).items()}
    assert installed.pop("cnnserve") == "0.1.0"
    assert installed == locked("image.txt")


def test_every_package_install_in_the_dockerfile_requires_hashes():
    """Every pip install takes a lock file with --require-hashes, but the one of the wheel the build
    stage itself made from the sources."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    installs = re.findall(r"pip(?: --python \S+)? install [^&\n]+", text)
    assert len(installs) == 6, installs  # build tools, packages, the wheel: in each image
    for command in installs:
        assert re.search(r"--require-hashes\s+-r /src/requirements/\S+\.txt", command) or re.search(
            r"--no-deps /tmp/wheel/\*\.whl", command
        ), command


def test_the_sbom_lists_every_package_in_the_image(production):
    sbom = json.loads(production.exec("cat", "/usr/share/doc/cnnserve/sbom.cdx.json").stdout)
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"].startswith("1.")
    root = sbom["metadata"]["component"]  # cnnserve itself, from pyproject.toml: the packages' dependant
    assert (root["name"], root["version"]) == ("cnnserve", "0.1.0")
    components = {canonicalize_name(c["name"]): c for c in sbom["components"]}
    assert {name: c["version"] for name, c in components.items()} == locked("image.txt")
    for name, component in components.items():
        assert component["purl"] == f"pkg:pypi/{name}@{component['version']}"


# -- the lock files, without an engine ----------------------------------------------------


def pyproject_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def lock_input(name: str) -> list[str]:
    lines = (REQUIREMENTS / name).read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_the_lock_input_is_pyprojects_service_dependencies():
    assert lock_input("image.in") == pyproject_dependencies(), "pyproject.toml changed: run make lock"


@pytest.mark.parametrize(
    ("source", "lock", "python"), [("image.in", "image.txt", "3.11"), ("image-gpu.in", "image-gpu.txt", "3.12")]
)
def test_each_lock_pins_what_its_input_asks_for(source, lock, python):
    pins = locked(lock, python)
    for line in lock_input(source):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock} lacks {name}: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock}: {name}=={pins[name]} is not {line}"
        )
    text = (REQUIREMENTS / lock).read_text()
    assert "--hash=sha256:" in text and all(
        "--hash=sha256:" in block for block in re.split(r"\n(?=[a-z0-9])", text) if re.match(r"[a-z0-9]", block)
    ), "every pin carries hashes"


def test_the_gpu_lock_is_the_cpu_set_with_onnxruntime_gpu():
    """The gpu image (Ubuntu 24.04's Python 3.12) installs the cpu image's packages, same versions,
    with onnxruntime-gpu in place of onnxruntime."""
    cpu, gpu = locked("image.txt", "3.12"), locked("image-gpu.txt", "3.12")
    assert cpu.pop("onnxruntime") and gpu.pop("onnxruntime-gpu")
    assert gpu == cpu
    assert lock_input("image-gpu.in") == [
        line for line in pyproject_dependencies() if canonicalize_name(Requirement(line).name) != "onnxruntime"
    ] + ["onnxruntime-gpu>=1.27,<2"]


@pytest.mark.parametrize("lock", ["image-gpu.txt", "build.txt"])
def test_the_gpu_images_locks_resolve_to_hashed_wheels_for_the_cuda_base(tmp_path, lock):
    """Without the CUDA base: every pin of the gpu stages' locks (the packages, the build tools) has a
    wheel for the base's CPython 3.12 on x86_64 Linux on PyPI whose hash the lock allows (pip's dry
    run, metadata only)."""
    environment = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--require-hashes", "--quiet"),
            *("--only-binary", ":all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"),
            *(option for glibc in range(39, 4, -1) for option in ("--platform", f"manylinux_2_{glibc}_x86_64")),
            *("--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"),
            *("--target", str(tmp_path / "target")),
            *("--index-url", "https://pypi.org/simple", "--report", str(tmp_path / "report.json")),
            *("-r", str(REQUIREMENTS / lock)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    chosen = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    assert chosen == locked(lock, "3.12")


# -- compose ---------------------------------------------------------------------------------


def test_the_compose_file_is_valid_against_the_compose_specification():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert [error.message for error in validator.iter_errors(compose)] == []
    compose["services"]["cnnserve-cpu"]["stop_grace_periods"] = "45s"  # the validator catches a typo
    assert list(validator.iter_errors(compose))


def test_the_cpu_profile_comes_up_answers_and_down_leaves_nothing(image):
    if image.engine[0] == "docker":
        compose = ["docker", "compose"]
    else:
        podman_compose = shutil.which("podman-compose", path=str(Path(sys.executable).parent))
        assert podman_compose, "podman-compose is not installed (the dev extra brings it)"
        compose = [podman_compose, "--podman-args=--runtime runc", f"--podman-run-args={' '.join(image.run_options)}"]
    project = f"cnnserve-test-{os.getpid()}"
    http, grpc_port = free_port(), free_port()
    environment = {**os.environ, "CNNSERVE_PUBLISH_PORT": str(http), "CNNSERVE_GRPC_PUBLISH_PORT": str(grpc_port)}
    command = [*compose, "--project-name", project, "--profile", "cpu"]

    def leftovers() -> list[str]:
        listed = image(
            "ps", "--all", "--filter", f"label=com.docker.compose.project={project}", "--format", "{{.Names}}"
        )
        return listed.stdout.split()

    try:
        up = subprocess.run(
            [*command, "up", "-d"], env=environment, capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        deadline = time.monotonic() + 120
        while not ready(f"http://127.0.0.1:{http}"):
            assert time.monotonic() < deadline, "the compose service never became ready"
            time.sleep(0.3)
        status, body, _ = get(f"http://127.0.0.1:{http}/models")
        assert status == 200 and json.loads(body)["default_model"] == "efficientnet_lite0"
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert leftovers(), "the service runs under the project's label"
        down = subprocess.run(
            [*command, "down"], env=environment, capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
        assert leftovers() == []
        assert get_status(f"http://127.0.0.1:{http}/healthz") == 0, "nothing answers once down"
    finally:
        for name in leftovers():
            image("rm", "--force", name, check=False)
        if image.engine[0] == "podman":
            image("pod", "rm", "--force", f"pod_{project}", check=False)
            image("network", "rm", "--force", f"{project}_default", check=False)
