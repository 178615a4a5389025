"""Thousands of mutated image files at the decode path, and schemathesis at the OpenAPI document:
only 200 or a 4xx may come back, never a server error."""

import io

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.config import Settings
from app.http.app import create_app
from app.serving import preprocess as imaging
from app.serving.errors import ServingError
from app.serving.spec import ModelSpec

from ..conftest import MODELS

SPEC = ModelSpec.model_validate_json((MODELS / "lenet5" / "model.json").read_text()).input


def seeds() -> list[bytes]:
    """One small real image in every supported format, plus a few modes the decoder converts."""
    import skimage.data

    photo = Image.open(skimage.data.__file__.replace("__init__.py", "chelsea.png")).resize((40, 27))
    files = []
    for fmt, image in [
        ("JPEG", photo),
        ("PNG", photo),
        ("WEBP", photo),
        ("BMP", photo),
        ("GIF", photo),
        ("TIFF", photo),
        ("PNG", photo.convert("P")),
        ("PNG", photo.convert("RGBA")),
        ("JPEG", photo.convert("CMYK")),
        ("TIFF", photo.convert("I;16")),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        files.append(buffer.getvalue())
    return files


SEEDS = seeds()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "header" and len(data) > 32:
            index = draw(st.integers(0, 31))
            data[index] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_decode_or_are_refused_with_a_4xx(data):
    try:
        tensor = imaging.prepare(data, SPEC, 4_000_000)
    except ServingError as refused:
        assert 400 <= refused.status < 500
    else:
        assert tensor.shape == (1, 1, 28, 28)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=mutated())
def test_mutated_images_over_http_get_200_or_4xx(client, data):
    response = client.post("/classify?model=lenet5", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 200 or 400 <= response.status_code < 500


schema = schemathesis.openapi.from_dict(create_app(Settings(models_dir=MODELS)).openapi())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_openapi_document_holds_no_server_errors(case, live_url):
    case.call_and_validate(base_url=live_url, checks=[schemathesis.checks.not_a_server_error])
