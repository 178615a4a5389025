"""Access control against a real `cnnserve serve` with two server processes, over raw sockets where
a client library would tidy the request up: bypass attempts, a key rotated under load, rate limits
that hold across the processes, and clients stalled inside their headers."""

from __future__ import annotations

import http.client
import shutil
import socket
import threading
import time
import urllib.request
from collections import Counter

import pytest

from ..conftest import MODELS, live_server
from .access_helpers import entry, new_key, write_atomically

HEADER_TIMEOUT_S = 1.5
MARGIN_S = 5.0  # generous: two server processes and the tests share two cores
READ, ADMIN, STEADY, LIMITED, FAIR_A, FAIR_B, CUT = (new_key(n) for n in ("r", "a", "s", "l", "fa", "fb", "c"))
RATE, BURST = 2, 10


def keys_text(rotating: str) -> str:
    return "".join(
        [
            entry("reader", READ, ["read"]),
            entry("admin", ADMIN, ["admin", "read"]),
            entry("steady", STEADY, ["read", "infer"]),
            entry("rotating", rotating, ["read"]),
            entry("limited", LIMITED, ["read"], rate=RATE, burst=BURST),
            entry("fair-a", FAIR_A, ["read"], rate=5, burst=5),
            entry("fair-b", FAIR_B, ["read"], rate=5, burst=5),
            entry("cut", CUT, ["infer"], rate=0.1, burst=1),
        ]
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(keys_text(new_key("rot")))
    return path


@pytest.fixture(scope="module")
def port(keys, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(MODELS / "lenet5", models / "lenet5")
    with live_server(
        CNNSERVE_MODELS_DIR=str(models),
        CNNSERVE_DEFAULT_MODEL="lenet5",
        CNNSERVE_PROCESSES="2",
        CNNSERVE_MODEL_CONTROL="explicit",
        CNNSERVE_LOAD_MODELS="lenet5",
        CNNSERVE_KEYS_FILE=str(keys),
        CNNSERVE_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
    ) as (url, _):
        yield int(url.rsplit(":", 1)[1])


def raw(port: int, request: bytes) -> int:
    """The status the server answers to exactly these bytes, on a fresh connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=MARGIN_S) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, f"closed before a status line: {data!r}"
            data += chunk
    return int(data.split(b" ", 2)[1])


def request(method: str, target: str, *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: test", "content-length: 0", "connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def get(port: int, path: str, key: str) -> tuple[int, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=MARGIN_S + 10)
    try:
        connection.request("GET", path, headers={"x-api-key": key})
        response = connection.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


@pytest.mark.parametrize(
    "target",
    ["/v2/../v2/repository/index", "//v2/repository/index", "/v2/./repository/index", "/static/../metrics"],
)
def test_paths_that_are_not_canonical_are_refused(port, target):
    assert raw(port, request("POST", target, f"x-api-key: {READ}")) == 400


def test_an_encoded_slash_does_not_hide_an_admin_path(port):
    assert raw(port, request("POST", "/v2/repository%2Findex", f"x-api-key: {READ}")) == 403
    assert raw(port, request("POST", "/v2/repository%2Findex", f"x-api-key: {ADMIN}")) == 200


@pytest.mark.parametrize("header", ["X-API-KEY", "x-api-key", "X-Api-Key"])
def test_header_names_in_any_case_carry_the_same_key_and_the_same_scopes(port, header):
    assert raw(port, request("GET", "/metrics", f"{header}: {READ}")) == 403
    assert raw(port, request("GET", "/models", f"{header}: {READ}")) == 200


def test_the_bearer_scheme_in_any_case_is_accepted(port):
    assert raw(port, request("GET", "/models", f"authorization: BEARER {READ}")) == 200


@pytest.mark.parametrize(
    "headers",
    [
        (f"x-api-key: {READ}", f"x-api-key: {ADMIN}"),
        (f"authorization: Bearer {READ}", f"authorization: Bearer {ADMIN}"),
        (f"x-api-key: {READ}", f"authorization: Bearer {ADMIN}"),
    ],
    ids=["two-keys", "two-authorizations", "key-and-authorization"],
)
def test_two_credentials_in_one_request_are_refused(port, headers):
    assert raw(port, request("GET", "/metrics", *headers)) == 401


@pytest.mark.parametrize("parameter", ["api_key", "key", "token", "access_token", "API_KEY"])
def test_a_key_in_the_query_string_is_refused_even_with_a_header(port, parameter):
    assert raw(port, request("GET", f"/models?{parameter}={READ}")) == 401
    assert raw(port, request("GET", f"/models?{parameter}={READ}", f"x-api-key: {READ}")) == 401


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS"])
def test_head_and_options_on_protected_paths_need_the_scope(port, method):
    assert raw(port, request(method, "/v2/repository/index")) == 401
    assert raw(port, request(method, "/v2/repository/index", f"x-api-key: {READ}")) == 403
    assert raw(port, request(method, "/models")) == 401


def test_a_key_rotated_under_load_fails_no_request_made_with_a_key_valid_across(port, keys):
    """Four clients keep asking with a key that stays while another key is replaced ten times."""
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            statuses[get(port, "/models", STEADY)[0]] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    rotated = []
    for _ in range(10):
        rotated.append(new_key("rot"))
        write_atomically(keys, keys_text(rotated[-1]))
        time.sleep(0.3)
    time.sleep(1.0)  # both processes look at the file at most every 0.5 s
    stop.set()
    for thread in threads:
        thread.join()
    assert statuses[200] > 20 and set(statuses) == {200}, statuses
    assert get(port, "/models", rotated[-1])[0] == 200
    assert get(port, "/models", rotated[0])[0] == 401


def test_a_rate_limit_holds_across_both_processes(port):
    """40 requests on fresh connections, which the kernel spreads over the two processes: a
    bucket per process would let 2 x BURST through."""
    started = time.monotonic()
    answers = [get(port, "/models", LIMITED) for _ in range(40)]
    elapsed = time.monotonic() - started
    allowed = sum(1 for status, _ in answers if status == 200)
    assert BURST <= allowed <= BURST + RATE * elapsed + 1, (allowed, elapsed)
    refused = next(headers for status, headers in answers if status == 429)
    assert int(refused["retry-after"]) >= 1
    assert refused["ratelimit-policy"] == f'"cnnserve";q={BURST};w={BURST // RATE}'
    assert refused["ratelimit"].startswith('"cnnserve";r=0;t=')


def test_an_admitted_request_carries_its_remaining_quota(port):
    time.sleep(BURST / RATE)  # the bucket of the test before refills
    status, headers = get(port, "/models", LIMITED)
    assert status == 200 and headers["ratelimit"].startswith(f'"cnnserve";r={BURST - 1};')


def test_two_clients_flooding_each_get_their_share(port):
    """One client floods from six threads, the other from two: each gets its own rate, the
    heavier one takes nothing of the lighter one's."""
    served: Counter[str] = Counter()
    stop_at = time.monotonic() + 3.0

    def flood(name: str, key: str) -> None:
        while time.monotonic() < stop_at:
            if get(port, "/models", key)[0] == 200:
                served[name] += 1

    threads = [threading.Thread(target=flood, args=("a", FAIR_A)) for _ in range(6)]
    threads += [threading.Thread(target=flood, args=("b", FAIR_B)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = 5 + 5 * 3.0  # the burst, then the rate
    assert expected * 0.6 <= served["b"] <= expected + 3, served
    assert expected * 0.6 <= served["a"] <= expected + 3, served


def healthz_seconds(port: int) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        assert response.status == 200
    return time.monotonic() - started


def test_two_hundred_clients_stalled_mid_header_are_closed_in_time_while_healthz_answers(port):
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT_S + MARGIN_S) for _ in range(200)]
    try:
        started = time.monotonic()
        for sock in sockets:
            sock.sendall(b"GET /models HTTP/1.1\r\nhost: test\r\nx-api-")  # and nothing more
        meanwhile = [healthz_seconds(port) for _ in range(5)]
        for sock in sockets:
            assert sock.recv(1) == b""  # closed by the server, cleanly
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert HEADER_TIMEOUT_S - 0.1 < elapsed < HEADER_TIMEOUT_S + MARGIN_S
    assert max(meanwhile) < 1.0, meanwhile


def upload_head(key: str | None, length: int) -> bytes:
    auth = f"x-api-key: {key}\r\n" if key else ""
    return (
        f"POST /classify HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-type: image/png\r\n"
        f"{auth}content-length: {length}\r\n\r\n"
    ).encode()


def status_then_close_seconds(sock: socket.socket) -> tuple[int, float]:
    """The status of the answer, and how long after it the server closed the connection."""
    data = b""
    while b"\r\n" not in data:
        data += sock.recv(65536)
    answered = time.monotonic()
    while sock.recv(65536):
        pass
    return int(data.split(b" ", 2)[1]), time.monotonic() - answered


def test_a_refused_body_is_read_to_its_end_then_the_connection_closes(port):
    """The client reads its 401 before the close (no reset mid-upload), and the close comes as soon
    as the last byte is in, not at a timeout."""
    body = bytes(6 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=MARGIN_S) as sock:
        sock.sendall(upload_head(None, len(body)) + body)
        status, closed_after = status_then_close_seconds(sock)
    assert status == 401 and closed_after < 1.0


def test_a_client_over_its_rate_limit_is_closed_at_once_its_body_unread(port):
    """Its headers announce 10 MB that never come: it is answered 429 and closed at once, where a
    refused body is otherwise waited for (up to two seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=MARGIN_S) as sock:
        sock.sendall(upload_head(CUT, 10) + bytes(10))  # spends the burst of one (400: not an image)
        assert status_then_close_seconds(sock)[0] == 400
    with socket.create_connection(("127.0.0.1", port), timeout=MARGIN_S) as sock:
        sock.sendall(upload_head(CUT, 10 << 20))
        status, closed_after = status_then_close_seconds(sock)
    assert status == 429 and closed_after < 0.5
