"""Clients that send their headers and then stall, or never send the body the app answered without:
against a real server over raw sockets, no connection outlives CNNSERVE_BODY_TIMEOUT_S."""

import shutil
import socket
import time
import urllib.request

import pytest
from PIL import Image

from ..conftest import MODELS, live_server, png_bytes

BODY_TIMEOUT_S = 1.5
KEY = "s3cret"
MARGIN_S = 5.0  # generous: the server shares two cores with the tests


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One process serving LeNet-5 alone (it starts in a second), behind an API key."""
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(MODELS / "lenet5", models / "lenet5")
    with live_server(
        CNNSERVE_MODELS_DIR=str(models),
        CNNSERVE_DEFAULT_MODEL="lenet5",
        CNNSERVE_PROCESSES="1",
        CNNSERVE_API_KEY=KEY,
        CNNSERVE_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
    ) as (url, _):
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def image(photos) -> bytes:
    return png_bytes(Image.open(photos["chelsea"]).convert("L").resize((28, 28)))


def head(length: int, *, key: str | None = KEY, content_type: str = "image/png", extra: str = "") -> bytes:
    """A POST /classify's request line and headers, announcing a body of ``length`` bytes."""
    auth = f"x-api-key: {key}\r\n" if key else ""
    return (
        f"POST /classify?top_k=1 HTTP/1.1\r\nhost: test\r\ncontent-type: {content_type}\r\n"
        f"content-length: {length}\r\n{auth}{extra}\r\n"
    ).encode()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + MARGIN_S)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    header, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = header.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of the response"
        body += chunk
    return int(status_line.split()[1]), headers, body


def assert_closed(sock: socket.socket, within: float) -> None:
    """The server closes the connection cleanly (no reset) within ``within`` seconds."""
    sock.settimeout(within)
    assert sock.recv(1) == b""


def healthz_seconds(port: int) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        assert response.status == 200
    return time.monotonic() - started


def test_a_client_that_stalls_after_its_headers_gets_408_and_its_connection_closed(server):
    with connect(server) as sock:
        sent = time.monotonic()
        sock.sendall(head(1000))
        status, headers, body = read_response(sock)
        answered = time.monotonic() - sent
        assert status == 408 and b"to arrive" in body
        assert headers["connection"] == "close"
        assert BODY_TIMEOUT_S - 0.1 < answered < BODY_TIMEOUT_S + MARGIN_S
        assert_closed(sock, within=MARGIN_S)


def test_many_stalled_clients_are_all_closed_while_the_server_stays_live(server):
    sockets = [connect(server) for _ in range(50)]
    try:
        started = time.monotonic()
        for sock in sockets:
            sock.sendall(head(1000))
        meanwhile = [healthz_seconds(server) for _ in range(5)]
        statuses = []
        for sock in sockets:  # a model's capacity admits 40 of them; the rest get their 429 at once
            status, headers, _ = read_response(sock)
            statuses.append(status)
            assert headers["connection"] == "close"
            assert_closed(sock, within=BODY_TIMEOUT_S + MARGIN_S)
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert set(statuses) <= {408, 429} and 408 in statuses
    assert elapsed < BODY_TIMEOUT_S + MARGIN_S
    assert max(meanwhile) < 1.0, meanwhile
    assert healthz_seconds(server) < 1.0


@pytest.mark.parametrize(
    ("key", "content_type", "status"),
    [(None, "image/png", 401), (KEY, "text/plain", 415)],
    ids=["unauthorized", "unsupported-media-type"],
)
def test_a_client_answered_before_its_body_is_told_to_close_and_closed(server, key, content_type, status):
    with connect(server) as sock:
        sent = time.monotonic()
        sock.sendall(head(1000, key=key, content_type=content_type))
        answered, headers, _ = read_response(sock)
        assert answered == status and time.monotonic() - sent < BODY_TIMEOUT_S  # answered at once
        assert headers["connection"] == "close"
        assert_closed(sock, within=BODY_TIMEOUT_S + MARGIN_S)  # at the deadline: no body came


def test_a_client_still_uploading_when_answered_reads_its_answer_before_the_close(server):
    """The rest of the body is read before the connection closes: closed with unread bytes, the
    socket would send a reset, and the client's upload would fail instead of reading its 401."""
    body = bytes(4 * 1024 * 1024)
    with connect(server) as sock:
        sock.sendall(head(len(body), key=None))
        sock.sendall(body)
        status, headers, _ = read_response(sock)
        assert status == 401 and headers["connection"] == "close"
        assert_closed(sock, within=BODY_TIMEOUT_S + MARGIN_S)


def test_a_client_waiting_for_100_continue_is_answered_and_closed_at_once(server):
    with connect(server) as sock:
        sent = time.monotonic()
        sock.sendall(head(1000, key=None, extra="expect: 100-continue\r\n"))
        status, headers, _ = read_response(sock)
        assert status == 401 and headers["connection"] == "close"  # no "100 Continue" first
        assert_closed(sock, within=MARGIN_S)
        assert time.monotonic() - sent < BODY_TIMEOUT_S


def test_a_slow_but_steady_upload_within_the_timeout_is_answered_and_kept_alive(server, image):
    pieces = [image[i : i + len(image) // 4 + 1] for i in range(0, len(image), len(image) // 4 + 1)]
    with connect(server) as sock:
        sock.sendall(head(len(image)))
        for piece in pieces:  # over about 0.6 s of the 1.5 s allowed
            time.sleep(0.15)
            sock.sendall(piece)
        status, headers, body = read_response(sock)
        assert status == 200 and b"predictions" in body
        assert "connection" not in headers
        sock.sendall(head(len(image)) + image)  # the same connection serves the next request
        assert read_response(sock)[0] == 200


def test_a_big_body_still_gets_413_and_its_connection_closed(server):
    with connect(server) as sock:
        sock.sendall(head(64 * 1024 * 1024))
        status, headers, _ = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert_closed(sock, within=MARGIN_S)
