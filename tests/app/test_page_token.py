"""Tokens for browsers, in Debian's Chromium against a real server: a web app on another origin
calls the API with CORS and a short-lived token minted by `cnnserve token`, then sees the same token,
expired, refused with 401 and a WWW-Authenticate it can read; and the service's own page takes a
token handed to it in the address's fragment."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from ..conftest import MODELS, ROOT, free_port, live_server
from .access_helpers import SECRET
from .conftest import CHROMIUM

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test does it)")

TTL_S = 4
APP_PAGE = b"<!doctype html><title>someone's web app</title><p>a web app on its own origin</p>"


class AppPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(APP_PAGE)))
        self.end_headers()
        self.wfile.write(APP_PAGE)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def web_app() -> Iterator[str]:
    """Another origin: the page of someone's web app, served by a server of its own."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), AppPage)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()
    server.server_close()


@pytest.fixture(scope="module")
def api(web_app, tmp_path_factory) -> Iterator[str]:
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(MODELS / "lenet5", models / "lenet5")
    with live_server(
        CNNSERVE_MODELS_DIR=str(models),
        CNNSERVE_DEFAULT_MODEL="lenet5",
        CNNSERVE_PROCESSES="1",
        CNNSERVE_JWT_SECRET=SECRET,
        CNNSERVE_CORS_ORIGINS=web_app,
    ) as (url, _):
        yield url


def minted(scope: str, ttl: str) -> str:
    """What a backend does for its page: `cnnserve token`."""
    command = [sys.executable, "-m", "app", "token", "--scope", scope, "--ttl", ttl]
    environment = {**os.environ, "CNNSERVE_JWT_SECRET": SECRET}
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, check=True).stdout.strip()


CALL = """async ([url, token, body]) => {
    const response = await fetch(url, {
        method: body ? "POST" : "GET",
        headers: { Authorization: `Bearer ${token}`, ...(body ? { "Content-Type": "image/png" } : {}) },
        body: body ? new Uint8Array(body) : undefined,
    });
    const challenge = response.headers.get("WWW-Authenticate");
    return { status: response.status, body: await response.text(), challenge };
}"""


def test_another_origin_calls_with_a_token_then_sees_it_expire(browser, web_app, api, photos):
    page = browser.new_page()
    try:
        page.goto(web_app)
        token = minted("infer", f"{TTL_S}s")
        issued = time.monotonic()
        image = list(photos["chelsea"].read_bytes())
        answered = page.evaluate(CALL, [f"{api}/classify?top_k=1", token, image])
        assert answered["status"] == 200 and '"model":"lenet5"' in answered["body"]
        time.sleep(max(0.0, TTL_S + 1.5 - (time.monotonic() - issued)))
        expired = page.evaluate(CALL, [f"{api}/classify?top_k=1", token, image])
        assert expired["status"] == 401 and "expired" in expired["body"]
        assert 'error="invalid_token"' in expired["challenge"]
    finally:
        page.close()


def test_a_token_without_the_scope_is_403_in_the_browser_too(browser, web_app, api):
    page = browser.new_page()
    try:
        page.goto(web_app)
        answered = page.evaluate(CALL, [f"{api}/models", minted("infer", "1m"), None])
        assert answered["status"] == 403 and 'scope="read"' in answered["challenge"]
    finally:
        page.close()


def test_the_page_takes_a_token_from_its_fragment_and_drops_it_from_the_address(browser, api):
    page = browser.new_page()
    try:
        page.goto(f"{api}/#token={minted('read', '1m')}")
        expect(page.locator("#model option")).to_have_count(1, timeout=30_000)
        expect(page.locator("#model")).to_have_value("lenet5")
        assert "#" not in page.url and "token" not in page.url
    finally:
        page.close()
