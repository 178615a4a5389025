"""Every error status in the contract, each with a JSON detail, and the service healthy after."""

import io
import struct
import zlib

import pytest
from PIL import Image

from app.config import Settings

from ..conftest import MODELS, png_bytes, running_client


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size, with valid CRCs and almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def small_limits():
    with running_client(Settings(models_dir=MODELS, max_body_bytes=50_000, max_pixels=1_000_000)) as client:
        yield client


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = str(response.json()["detail"])
    for word in words:
        assert word in detail


def test_garbage_bytes_are_400(client):
    assert_error(client.post("/classify", content=b"not an image", headers={"content-type": "image/png"}), 400, "PNG")


def test_a_truncated_jpeg_is_400(client, photos):
    data = photos["rocket"].read_bytes()
    response = client.post("/classify", content=data[: len(data) // 3], headers={"content-type": "image/jpeg"})
    assert_error(response, 400, "truncated")


def test_an_empty_body_is_400(client):
    assert_error(client.post("/classify", content=b"", headers={"content-type": "image/jpeg"}), 400, "no image")


def test_unknown_model_is_404(client, photos):
    response = client.post("/classify?model=vgg16", files={"file": photos["chelsea"].read_bytes()})
    assert_error(response, 404, "vgg16", "lenet5")


def test_unknown_model_details_are_404(client):
    assert_error(client.get("/models/nope"), 404, "nope")


def test_a_model_name_that_is_not_a_name_is_422(client, photos):
    response = client.post("/classify?model=../../etc/passwd", files={"file": photos["chelsea"].read_bytes()})
    assert response.status_code == 422


def test_a_body_over_the_limit_is_413(small_limits, photos):
    response = small_limits.post(
        "/classify", content=photos["coffee"].read_bytes(), headers={"content-type": "image/png"}
    )
    assert_error(response, 413, "50000")


def test_a_chunked_body_over_the_limit_is_413(small_limits):
    chunks = iter([b"\0" * 30_000, b"\0" * 30_000])
    response = small_limits.post("/classify", content=chunks, headers={"content-type": "image/png"})
    assert_error(response, 413, "50000")


def test_a_decompression_bomb_is_413_before_decoding(small_limits):
    response = small_limits.post("/classify", content=png_claiming(60000, 60000), headers={"content-type": "image/png"})
    assert_error(response, 413, "3600000000 pixels", "1000000")


def test_an_image_over_the_pixel_limit_is_413(small_limits):
    response = small_limits.post("/classify", content=png_claiming(2000, 1000), headers={"content-type": "image/png"})
    assert_error(response, 413, "2000x1000", "1000000")


def test_a_text_body_is_415(client):
    assert_error(client.post("/classify", content=b"hello", headers={"content-type": "text/plain"}), 415, "multipart")


def test_an_unsupported_image_type_is_415(client):
    assert_error(client.post("/classify", content=b"\0\0\1\0", headers={"content-type": "image/x-icon"}), 415, "JPEG")


def test_an_unsupported_part_type_is_415(client):
    assert_error(client.post("/classify", files={"file": ("a.svg", b"<svg/>", "image/svg+xml")}), 415, "svg")


def test_multipart_without_a_file_part_is_422(client):
    assert_error(client.post("/classify", data={"image": "x"}, files={"other": b"x"}), 422, "'file'")


def multipart(*parts: tuple[str, bytes], end: bytes = b"--edge--\r\n") -> tuple[bytes, dict]:
    """A multipart/form-data body built by hand, so that it can be broken on purpose."""
    body = b"".join(
        b'--edge\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + data + b"\r\n"
        for name, data in parts
    )
    return body + end, {"content-type": "multipart/form-data; boundary=edge"}


def test_a_part_named_file_without_a_filename_is_the_image(client, photos):
    body, headers = multipart(("note", b"hello"), ("file", photos["chelsea"].read_bytes()))
    response = client.post("/classify", content=body, headers=headers)
    assert response.status_code == 200
    assert "cat" in response.json()["predictions"][0]["label"]


def test_a_multipart_body_that_ends_inside_the_file_is_400(client, photos):
    body, headers = multipart(("file", photos["chelsea"].read_bytes()), end=b"")
    assert_error(client.post("/classify", content=body[:-100], headers=headers), 400, "ends inside", "'file'")


def test_a_multipart_body_without_a_boundary_is_400(client, photos):
    response = client.post("/classify", content=b"x", headers={"content-type": "multipart/form-data"})
    assert_error(response, 400, "boundary")


def test_a_malformed_multipart_body_is_400(client):
    body = b"--edge\r\nContent-Disposition form-data\r\n\r\nx\r\n--edge--\r\n"
    response = client.post("/classify", content=body, headers={"content-type": "multipart/form-data; boundary=edge"})
    assert_error(response, 400, "multipart")


def test_two_file_parts_are_400(client, photos):
    data = photos["chelsea"].read_bytes()
    body, headers = multipart(("file", data), ("file", data))
    assert_error(client.post("/classify", content=body, headers=headers), 400, "more than one part named 'file'")


def test_too_many_parts_are_400(client, photos):
    body, headers = multipart(*[(f"f{i}", b"x") for i in range(9)], ("file", photos["chelsea"].read_bytes()))
    assert_error(client.post("/classify", content=body, headers=headers), 400, "more than 8 parts")


def test_a_large_text_part_is_413(client, photos):
    body, headers = multipart(("note", b"x" * 70_000), ("file", photos["chelsea"].read_bytes()))
    assert_error(client.post("/classify", content=body, headers=headers), 413, "'note'", "65536 bytes")


@pytest.mark.parametrize("query", ["top_k=0", "top_k=abc", "top_k=101", "model="])
def test_bad_parameters_are_422(client, photos, query):
    response = client.post(f"/classify?{query}", files={"file": photos["chelsea"].read_bytes()})
    assert response.status_code == 422
    assert "detail" in response.json()


def test_the_service_is_healthy_after_bad_input(client, photos):
    for bad in (b"", b"\xff\xd8\xff", png_claiming(1, 1)):
        client.post("/classify", content=bad, headers={"content-type": "image/jpeg"})
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    ok = client.post(
        "/classify",
        content=png_bytes(Image.open(io.BytesIO(photos["chelsea"].read_bytes()))),
        headers={"content-type": "image/png"},
    )
    assert ok.status_code == 200


def test_under_v2_a_body_over_the_limit_is_an_error_body(small_limits):
    too_big = small_limits.post("/v2/models/lenet5/infer", content=b"{" + b" " * 60_000 + b"}")
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]


def test_under_v2_unknown_routes_and_methods_are_error_bodies(client):
    unknown_route = client.get("/v2/nothing/here")
    assert unknown_route.status_code == 404 and unknown_route.json()["error"] == "Not Found"
    wrong_method = client.delete("/v2/models/lenet5/infer")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "Method Not Allowed"


def test_outside_v2_validation_errors_keep_fastapis_detail_list(client, photos):
    response = client.post("/classify?top_k=0", files={"file": photos["chelsea"].read_bytes()})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "top_k"]


def test_under_v2_a_validation_error_is_one_readable_line(client):
    response = client.post("/v2/models/Not%20A%20Name/infer", content=b"{}")
    assert response.status_code == 422
    assert response.json()["error"].startswith("path.name: String should match pattern")
