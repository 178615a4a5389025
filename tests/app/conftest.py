"""What the browser tests share: Debian's Chromium, launched once for each test module, and how they
wait for a picture."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
# The flags a root, offline, headless Chromium needs here (no sandbox as root, no background calls).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(os.environ.get("CNNSERVE_SCREENSHOTS", "runs/screenshots"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def shown(page, selector: str) -> None:
    """Waits until the image element holds a decoded picture fetched from the service."""
    page.wait_for_function(
        "s => { const img = document.querySelector(s); return img.src.startsWith('blob:') && img.naturalWidth > 0; }",
        arg=selector,
        timeout=30_000,
    )
