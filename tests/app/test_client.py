"""The Python client and the ``cnnserve classify`` command line, against a real server."""

import io
import subprocess
import sys

import pytest
from PIL import Image

from app.client import Client, ServiceError, media_type

from ..conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def service(live_url):
    with Client(live_url) as client:
        yield client


def test_classify_returns_typed_predictions_equal_to_the_http_answer(service, client, photos):
    typed = service.classify(photos["chelsea"], top_k=3)
    direct = client.post(
        "/classify?top_k=3", content=photos["chelsea"].read_bytes(), headers={"content-type": "image/png"}
    )
    assert typed.model == "efficientnet_lite0" and "cat" in typed.predictions[0].label
    expected = direct.json()["predictions"]
    assert [(p.index, p.label) for p in typed.predictions] == [(p["index"], p["label"]) for p in expected]
    assert [p.score for p in typed.predictions] == pytest.approx([p["score"] for p in expected], rel=1e-5)


def test_featuremaps_and_cam_come_back_as_pngs(service, photos):
    assert service.featuremaps(photos["coffee"], model="kernels").startswith(PNG_MAGIC)
    assert service.cam(photos["coffee"]).startswith(PNG_MAGIC)


def test_the_service_explanation_travels_in_the_error(service, photos):
    with pytest.raises(ServiceError) as error:
        service.classify(photos["coffee"], model="no_such_model")
    assert error.value.status == 404 and "unknown model" in error.value.detail


def test_models_lists_what_is_served(service):
    listing = service.models()
    assert listing.default_model == "efficientnet_lite0"
    assert {"lenet5", "kernels"} <= {m.name for m in listing.models if m.status == "ready"}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_the_media_type_is_read_from_the_bytes(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format=fmt)
    assert media_type(buffer.getvalue()) == Image.MIME[fmt]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_command_line_prints_the_top5_as_a_table(live_url, photos):
    result = cli("classify", str(photos["chelsea"]), "--url", live_url)
    lines = result.stdout.splitlines()
    assert result.returncode == 0
    assert lines[1].split() == ["rank", "score", "index", "label"]
    assert len(lines) == 7 and "cat" in lines[2]


def test_the_command_line_says_which_file_failed_and_exits_1(live_url, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = cli("classify", str(broken), "--url", live_url, "--model", "lenet5")
    assert result.returncode == 1
    assert "broken.jpg: 400" in result.stderr
