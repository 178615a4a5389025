"""Decoding and preprocessing: every format and pixel mode a client may send, the way the model
expects it, and the same tensor as the training side's reading of model.json."""

import io

import numpy as np
import pytest
from PIL import Image

from app.serving import preprocess as imaging
from app.serving.errors import ServingError
from app.serving.spec import InputSpec, ModelSpec
from training import photos as training_photos

from ..conftest import MODELS

EFFICIENTNET = ModelSpec.model_validate_json((MODELS / "efficientnet_lite0" / "model.json").read_text()).input
LENET = ModelSpec.model_validate_json((MODELS / "lenet5" / "model.json").read_text()).input
RAW_RGB = InputSpec(name="x", color="RGB", height=8, width=8, mean=[0, 0, 0], std=[1, 1, 1], interpolation="nearest")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("photo", ["chelsea", "coffee", "astronaut", "rocket", "grace_hopper"])
def test_service_preprocessing_is_within_one_grey_level_of_the_training_sides(photos, photo):
    """The service resizes only the box that survives the crop; the training side (torchvision's
    way) resizes the whole photo, then crops. A pixel may differ by one grey level, rarely."""
    served = imaging.prepare(photos[photo].read_bytes(), EFFICIENTNET, 10**8)
    reference = training_photos.preprocess(photos[photo], EFFICIENTNET.model_dump())
    grey_levels = np.abs(served - reference) * np.float32(EFFICIENTNET.std)[:, None, None]
    assert grey_levels.max() <= 1.0 + 1e-3
    assert np.count_nonzero(grey_levels > 1e-3) < 0.001 * grey_levels.size


def test_a_crop_larger_than_the_resized_image_is_padded_with_black():
    tall_crop = EFFICIENTNET.model_copy(update={"resize": 224, "height": 256, "width": 224})
    tensor = imaging.prepare(encode(Image.new("RGB", (448, 224), (255, 255, 255)), "PNG"), tall_crop, 10**6)
    rows = tensor[0, 0, :, 112] * 128 + 127  # back to grey levels
    assert tensor.shape == (1, 3, 256, 224) and rows[0] == 0 and rows[128] == 255


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_supported_format_decodes_to_the_input_shape(photos, fmt):
    image = Image.open(photos["chelsea"]).convert("RGB")
    assert imaging.prepare(encode(image, fmt), EFFICIENTNET, 10**8).shape == (1, 3, 224, 224)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 2))  # white band on top
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    tensor = imaging.prepare(encode(image, "PNG", exif=exif), RAW_RGB, 10**6)[0, 0]
    assert tensor[:, -2:].mean() > 200 and tensor[:, :2].mean() < 50  # the band is now on the right


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.all(imaging.prepare(encode(image, "PNG"), RAW_RGB, 10**6) == 255)


def test_a_palette_image_with_transparency_is_composited_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] * 256)
    assert np.all(imaging.prepare(encode(image, "PNG", transparency=0), RAW_RGB, 10**6) == 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    pixels = np.full((8, 8), 32768, np.uint16)
    image = Image.fromarray(pixels)
    tensor = imaging.prepare(encode(image, "PNG"), RAW_RGB, 10**6)
    assert np.allclose(tensor, 127.5, atol=1)


def test_cmyk_jpeg_converts_to_rgb():
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    tensor = imaging.prepare(encode(image, "JPEG", quality=100), RAW_RGB, 10**6)[0]
    assert tensor[0].mean() > 200 and tensor[1].mean() < 60 and tensor[2].mean() < 60


def test_an_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((0, 0, 255), (255, 0, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    tensor = imaging.prepare(data, RAW_RGB, 10**6)[0]
    assert tensor[2].mean() > 200 and tensor[0].mean() < 50


def test_colour_photos_become_grayscale_for_lenet(photos):
    assert imaging.prepare(photos["coffee"].read_bytes(), LENET, 10**8).shape == (1, 1, 28, 28)


def test_a_big_jpeg_is_decoded_at_reduced_scale():
    big = encode(Image.new("RGB", (4000, 3000), (90, 120, 150)), "JPEG")
    image = imaging.open_checked(big, 10**8)
    imaging.draft_for(image, EFFICIENTNET)
    image.load()
    assert image.size == (1000, 750)  # 1/4 scale: twice the 256-pixel shorter side the model needs


@pytest.mark.parametrize(("size", "decoded"), [((600, 400), (600, 400)), ((1100, 1030), (550, 515))])
def test_draft_keeps_twice_the_pixels_the_model_needs(size, decoded):
    image = imaging.open_checked(encode(Image.new("RGB", size), "JPEG"), 10**8)
    imaging.draft_for(image, EFFICIENTNET)
    image.load()
    assert image.size == decoded


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(ServingError) as refused:
        imaging.open_checked(encode(Image.new("L", (2000, 1000)), "PNG"), 1_000_000)
    assert refused.value.status == 413
