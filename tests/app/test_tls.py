"""TLS and mutual TLS on HTTP and gRPC, with a CA made here (trustme), against a real `cnnserve
serve`, with each client a user would take: curl, httpx, and tritonclient over HTTP and gRPC."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from ..conftest import MODELS, ROOT, free_port

STARTUP_S = 60.0


@dataclass
class Files:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # certificate and key in one PEM, as curl and httpx take it
    client_key: Path
    stranger_cert: Path  # signed by another CA


@dataclass
class Server:
    https: str
    grpc: str


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def files(tmp_path_factory, ca) -> Files:
    folder = tmp_path_factory.mktemp("tls")
    other_ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.org")
    stranger = other_ca.issue_cert("stranger@example.org")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    client.cert_chain_pems[0].write_to_path(str(folder / "client.pem"))
    client.private_key_pem.write_to_path(str(folder / "client.key"))
    stranger.private_key_and_cert_chain_pem.write_to_path(str(folder / "stranger.pem"))
    return Files(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "client.key",
        folder / "stranger.pem",
    )


@contextmanager
def tls_server(files: Files, models: Path, log: Path | None = None, **env: str) -> Iterator[Server]:
    """``cnnserve serve`` over TLS on free ports, writing its log to ``log`` if given; ready once
    /readyz answers over HTTPS."""
    port, grpc_port = free_port(), free_port()
    environment = {
        **os.environ,
        "CNNSERVE_PORT": str(port),
        "CNNSERVE_GRPC_PORT": str(grpc_port),
        "CNNSERVE_PROCESSES": "1",
        "CNNSERVE_MODELS_DIR": str(models),
        "CNNSERVE_DEFAULT_MODEL": "lenet5",
        "CNNSERVE_TLS_CERT": str(files.server_cert),
        "CNNSERVE_TLS_KEY": str(files.server_key),
        **env,
    }
    output = open(log, "w") if log else None  # noqa: SIM115  # closed with the server, below
    command = [sys.executable, "-m", "app", "serve"]
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=output, stderr=output and subprocess.STDOUT)
    server = Server(f"https://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")
    try:
        wait_ready(server.https, files, process)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        if output:
            output.close()


def context(files: Files, with_certificate: bool = False) -> ssl.SSLContext:
    """What httpx verifies the server with, and presents as the client's certificate if asked."""
    verify = ssl.create_default_context(cafile=str(files.ca))
    if with_certificate:
        verify.load_cert_chain(str(files.client_cert), str(files.client_key))
    return verify


def wait_ready(url: str, files: Files, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            if httpx.get(f"{url}/readyz", verify=context(files, True), timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert process.poll() is None, "the server exited before it was ready"
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(MODELS / "lenet5", folder / "lenet5")
    return folder


@pytest.fixture(scope="module")
def tls(files, models) -> Iterator[Server]:
    with tls_server(files, models) as server:
        yield server


@pytest.fixture(scope="module")
def mtls(files, models) -> Iterator[Server]:
    with tls_server(files, models, CNNSERVE_TLS_CLIENT_CA=str(files.ca)) as server:
        yield server


def curl(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *arguments], capture_output=True, text=True
    )


def tensor() -> np.ndarray:
    return np.zeros((1, 1, 28, 28), np.float32)


def test_curl_reads_https_with_the_ca(tls, files):
    assert curl("--cacert", str(files.ca), f"{tls.https}/models").stdout == "200"


def test_curl_refuses_a_server_it_cannot_verify(tls):
    assert curl(f"{tls.https}/models").returncode == 60  # SSL certificate problem


def test_plain_http_on_the_tls_port_gets_no_answer(tls):
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls.https.replace("https", "http") + "/healthz", timeout=5)


def test_httpx_classifies_over_https(tls, files, photos):
    response = httpx.post(
        f"{tls.https}/classify", files={"file": photos["chelsea"].read_bytes()}, verify=context(files), timeout=30
    )
    assert response.status_code == 200 and response.json()["model"] == "lenet5"


def test_tritonclient_http_infers_over_https(tls, files):
    import gevent.ssl

    client = triton_http.InferenceServerClient(
        tls.https.removeprefix("https://"),
        ssl=True,
        ssl_options={"ca_certs": str(files.ca)},
        ssl_context_factory=gevent.ssl.create_default_context,
    )
    x = triton_http.InferInput("input", [1, 1, 28, 28], "FP32")
    x.set_data_from_numpy(tensor())
    try:
        assert client.infer("lenet5", [x]).as_numpy("logits").shape == (1, 10)
    finally:
        client.close()


def test_tritonclient_grpc_infers_over_tls(tls, files):
    client = triton_grpc.InferenceServerClient(tls.grpc, ssl=True, root_certificates=str(files.ca))
    x = triton_grpc.InferInput("input", [1, 1, 28, 28], "FP32")
    x.set_data_from_numpy(tensor())
    try:
        assert client.infer("lenet5", [x]).as_numpy("logits").shape == (1, 10)
    finally:
        client.close()


def test_mtls_admits_a_client_certificate_signed_by_the_ca(mtls, files):
    cert = ("--cacert", str(files.ca), "--cert", str(files.client_cert), "--key", str(files.client_key))
    assert curl(*cert, f"{mtls.https}/models").stdout == "200"
    response = httpx.get(f"{mtls.https}/models", verify=context(files, True))
    assert response.status_code == 200


def test_mtls_refuses_a_client_without_a_certificate(mtls, files):
    assert curl("--cacert", str(files.ca), f"{mtls.https}/models").stdout == "000"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{mtls.https}/models", verify=context(files), timeout=5)


def test_mtls_refuses_a_certificate_from_another_ca(mtls, files):
    assert curl("--cacert", str(files.ca), "--cert", str(files.stranger_cert), f"{mtls.https}/models").stdout == "000"


def test_mtls_on_grpc_admits_the_ca_s_client_and_refuses_others(mtls, files):
    x = triton_grpc.InferInput("input", [1, 1, 28, 28], "FP32")
    x.set_data_from_numpy(tensor())
    good = triton_grpc.InferenceServerClient(
        mtls.grpc,
        ssl=True,
        root_certificates=str(files.ca),
        private_key=str(files.client_key),
        certificate_chain=str(files.client_cert),
    )
    anonymous = triton_grpc.InferenceServerClient(mtls.grpc, ssl=True, root_certificates=str(files.ca))
    try:
        assert good.infer("lenet5", [x]).as_numpy("logits").shape == (1, 10)
        with pytest.raises(InferenceServerException) as refused:
            anonymous.infer("lenet5", [x], client_timeout=10)
        assert refused.value.status() in {str(grpc.StatusCode.UNAVAILABLE), str(grpc.StatusCode.DEADLINE_EXCEEDED)}
    finally:
        good.close()
        anonymous.close()


def test_mtls_on_http_admits_tritonclient_with_its_certificate(mtls, files):
    import gevent.ssl

    client = triton_http.InferenceServerClient(
        mtls.https.removeprefix("https://"),
        ssl=True,
        ssl_options={"ca_certs": str(files.ca), "certfile": str(files.client_cert), "keyfile": str(files.client_key)},
        ssl_context_factory=gevent.ssl.create_default_context,
    )
    x = triton_http.InferInput("input", [1, 1, 28, 28], "FP32")
    x.set_data_from_numpy(tensor())
    try:
        assert client.infer("lenet5", [x]).as_numpy("logits").shape == (1, 10)
    finally:
        client.close()


def health_check(server: Server, files: Files, **env: str) -> subprocess.CompletedProcess:
    """``cnnserve probe /readyz`` as a container's health check runs it, with the server's settings."""
    environment = {
        **os.environ,
        "CNNSERVE_PORT": server.https.rsplit(":", 1)[1],
        "CNNSERVE_TLS_CERT": str(files.server_cert),
        "CNNSERVE_TLS_KEY": str(files.server_key),
        **env,
    }
    command = [sys.executable, "-m", "app", "probe", "/readyz"]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=30)


def test_the_health_check_probes_over_https(tls, files):
    assert health_check(tls, files).returncode == 0


def test_under_mtls_the_health_check_presents_the_server_certificate(mtls, files):
    assert health_check(mtls, files, CNNSERVE_TLS_CLIENT_CA=str(files.ca)).returncode == 0


def test_under_mtls_a_health_check_with_a_certificate_from_another_ca_fails_and_says_why(mtls, files):
    stranger = {"CNNSERVE_TLS_CERT": str(files.stranger_cert), "CNNSERVE_TLS_KEY": str(files.stranger_cert)}
    refused = health_check(mtls, files, CNNSERVE_TLS_CLIENT_CA=str(files.ca), **stranger)
    assert refused.returncode == 1 and "issued it for client authentication" in refused.stderr
    said = (
        refused.stderr.lower()
    )  # the server's refusal (TLS 1.3: after the handshake; 1.2: an alert), not a local failure
    assert "remote end closed" in said or "alert" in said, refused.stderr


def served_certificate(address: str, files: Files) -> bytes:
    """The certificate a new connection to ``host:port`` is shown (DER), verified with the CA."""
    host, port = address.removeprefix("https://").rsplit(":", 1)
    verify = context(files, with_certificate=True)
    verify.set_alpn_protocols(["h2", "http/1.1"])  # gRPC's port wants h2
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        verify.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def renew(folder: Path, certificate: trustme.LeafCert, *, with_key: bool = True) -> None:
    """As a renewal lands: each file written beside, then renamed over the old one."""
    halves = [("server.pem", certificate.cert_chain_pems[0])]
    halves += [("server.key", certificate.private_key_pem)] if with_key else []
    for name, blob in halves:
        blob.write_to_path(str(folder / f"{name}.new"))
        (folder / f"{name}.new").replace(folder / name)


@pytest.fixture
def renewable(files, models, tmp_path) -> Iterator[tuple[Server, Path]]:
    """A TLS server (mTLS: the client CA's clients only) on copies of the certificate files and the
    client CA, in a folder of its own that the test may renew."""
    shutil.copy(files.server_cert, tmp_path / "server.pem")
    shutil.copy(files.server_key, tmp_path / "server.key")
    shutil.copy(files.ca, tmp_path / "client-ca.pem")
    env = {
        "CNNSERVE_TLS_CERT": str(tmp_path / "server.pem"),
        "CNNSERVE_TLS_KEY": str(tmp_path / "server.key"),
        "CNNSERVE_TLS_CLIENT_CA": str(tmp_path / "client-ca.pem"),
    }
    with tls_server(files, models, log=tmp_path / "server.log", **env) as server:
        yield server, tmp_path


def until(condition, what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_renewed_certificate_is_served_without_a_restart_over_https_and_grpc(renewable, files, ca):
    server, folder = renewable
    assert served_certificate(server.https, files) == der(files.server_cert)
    renew(folder, ca.issue_cert("127.0.0.1", "localhost"))
    for address in (server.https, server.grpc):
        until(lambda at=address: served_certificate(at, files) == der(folder / "server.pem"), f"{address}: not renewed")
    response = httpx.get(f"{server.https}/models", verify=context(files, True))
    assert response.status_code == 200


def test_a_certificate_without_its_key_is_refused_once_and_the_one_before_served_on(renewable, files, ca):
    server, folder = renewable
    renew(folder, ca.issue_cert("127.0.0.1", "localhost"), with_key=False)
    time.sleep(2.5)  # two checks of the files, at most a second apart
    for address in (server.https, server.grpc):  # gRPC looks before each new connection's handshake
        assert served_certificate(address, files) == der(files.server_cert)
    assert httpx.get(f"{server.https}/models", verify=context(files, True)).status_code == 200
    logged = (folder / "server.log").read_text()
    assert logged.count("TLS certificate files refused") == 2, logged  # once for HTTPS, once for gRPC


def grpc_admits(server: Server, files: Files, client: trustme.LeafCert) -> bool:
    credentials = grpc.ssl_channel_credentials(
        files.ca.read_bytes(), client.private_key_pem.bytes(), client.cert_chain_pems[0].bytes()
    )
    with grpc.secure_channel(server.grpc, credentials) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
        return True


def https_admits(server: Server, files: Files, client: trustme.LeafCert, folder: Path) -> bool:
    client.private_key_and_cert_chain_pem.write_to_path(str(folder / "client.pem"))
    verify = ssl.create_default_context(cafile=str(files.ca))
    verify.load_cert_chain(str(folder / "client.pem"))
    try:
        return httpx.get(f"{server.https}/readyz", verify=verify, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_replaced_client_ca_admits_its_clients_and_no_longer_the_old_ones(renewable, files, ca, tmp_path_factory):
    server, folder = renewable
    old_client, new_ca = ca.issue_cert("old@example.org"), trustme.CA()
    new_client, scratch = new_ca.issue_cert("new@example.org"), tmp_path_factory.mktemp("clients")
    assert https_admits(server, files, old_client, scratch) and grpc_admits(server, files, old_client)
    new_ca.cert_pem.write_to_path(str(folder / "client-ca.pem.new"))
    (folder / "client-ca.pem.new").replace(folder / "client-ca.pem")
    until(lambda: https_admits(server, files, new_client, scratch), "HTTPS never admitted the new CA's client")
    until(lambda: grpc_admits(server, files, new_client), "gRPC never admitted the new CA's client")
    assert not https_admits(server, files, old_client, scratch)
    assert not grpc_admits(server, files, old_client)
