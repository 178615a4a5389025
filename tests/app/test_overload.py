"""A flood of big photos at the heaviest endpoint, against a real server: bounded in time here,
measured at length by ``python -m bench.stress overload --path /featuremaps``."""

import http.client
import io
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from ..conftest import live_server

CLIENTS = 64
SECONDS = 8.0
MAX_GROWTH_MB = 300


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the server processes)."""
    status = Path(f"/proc/{pid}/status").read_text()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    own = next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    return own + sum(rss_mb(int(child)) for child in children)


def post(port: int, path: str, body: bytes) -> tuple[int, float]:
    """Status and Retry-After of one request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers={"content-type": "image/jpeg"})
        response = connection.getresponse()
        response.read()
        return response.status, float(response.getheader("retry-after") or 0)
    finally:
        connection.close()


@pytest.fixture(scope="module")
def twelve_megapixels(photos) -> bytes:
    buffer = io.BytesIO()
    Image.open(photos["chelsea"]).convert("RGB").resize((4240, 2832)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.slow
def test_a_flood_of_big_photos_at_feature_maps_gets_429s_and_bounded_memory(twelve_megapixels):
    """64 clients sending 12-megapixel JPEGs to /featuremaps: some are refused at once with 429
    and Retry-After (which the clients honour), none fails with a 5xx, the service stays live,
    and its memory stays bounded (the first version computed every abandoned answer and grew by
    over a gigabyte)."""
    with live_server() as (url, process):
        port = int(url.rsplit(":", 1)[1])
        for _ in range(4):  # build the feature-map sessions in each server process first
            assert post(port, "/featuremaps", twelve_megapixels)[0] == 200
        warm = rss_mb(process.pid)
        statuses: Counter[int] = Counter()
        peak, live = [warm], []
        stop_at = time.monotonic() + SECONDS

        def client() -> None:
            while time.monotonic() < stop_at:
                status, retry_after = post(port, "/featuremaps", twelve_megapixels)
                statuses[status] += 1
                if status == 429:
                    time.sleep(min(retry_after, max(0.0, stop_at - time.monotonic())))

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak.append(rss_mb(process.pid))
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", "/healthz")
            live.append(connection.getresponse().status)
            connection.close()
            time.sleep(0.25)
        for thread in threads:
            thread.join()
    assert statuses[429] > 0 and statuses[200] > 0, statuses
    assert not [status for status in statuses if status >= 500], statuses
    assert set(live) == {200}
    assert max(peak) - warm < MAX_GROWTH_MB, f"grew from {warm:.0f} MB to {max(peak):.0f} MB"
