"""/classify against the real models: the same answers as the PyTorch and ONNX references."""

import io
import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from training.data import load_split

from ..conftest import MODELS, fashion_tensor, png_bytes

DOMESTIC_CATS = range(281, 286)  # tabby, tiger, Persian, Siamese, Egyptian cat
REFERENCE = json.loads((MODELS / "efficientnet_lite0" / "reference.json").read_text())["photos"]


@pytest.mark.parametrize("photo", sorted(REFERENCE))
def test_served_top5_equals_the_pytorch_reference(client, photos, photo):
    with open(photos[photo], "rb") as f:
        response = client.post("/classify", files={"file": (photos[photo].name, f)})
    assert response.status_code == 200
    served = response.json()["predictions"]
    expected = REFERENCE[photo]
    assert [p["index"] for p in served] == [p["index"] for p in expected]
    assert [p["label"] for p in served] == [p["label"] for p in expected]
    # 2e-4: ONNX Runtime against PyTorch, and the box resize against torchvision's (test_imaging)
    assert np.allclose([p["score"] for p in served], [p["score"] for p in expected], atol=2e-4)


def test_chelsea_is_a_cat_and_coffee_is_espresso(client, photos):
    chelsea = client.post("/classify", content=photos["chelsea"].read_bytes(), headers={"content-type": "image/png"})
    coffee = client.post("/classify", content=photos["coffee"].read_bytes(), headers={"content-type": "image/png"})
    assert "cat" in chelsea.json()["predictions"][0]["label"]
    assert coffee.json()["predictions"][0]["label"] == "espresso"


def test_raw_body_and_multipart_give_the_same_answer(client, photos):
    data = photos["rocket"].read_bytes()
    raw = client.post("/classify?model=efficientnet_lite0", content=data, headers={"content-type": "image/jpeg"})
    form = client.post("/classify?model=efficientnet_lite0", files={"file": ("rocket.jpg", data, "image/jpeg")})
    assert raw.json() == form.json()


def test_scores_are_probabilities_best_first(client, photos):
    body = client.post("/classify?top_k=10", files={"file": photos["astronaut"].read_bytes()}).json()
    scores = [p["score"] for p in body["predictions"]]
    assert len(scores) == 10 and scores == sorted(scores, reverse=True)
    assert 0 < sum(scores) <= 1.0 + 1e-9


def test_top_k_is_capped_at_the_number_of_classes(client, photos):
    body = client.post("/classify?model=lenet5&top_k=50", files={"file": photos["chelsea"].read_bytes()}).json()
    assert len(body["predictions"]) == 10
    assert abs(sum(p["score"] for p in body["predictions"]) - 1.0) < 1e-6


def test_default_model_answers_when_none_is_named(client, photos):
    body = client.post("/classify", files={"file": photos["coffee"].read_bytes()}).json()
    assert body["model"] == "efficientnet_lite0"


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "googlenet", "resnet"])
def test_fashion_mnist_through_http_matches_onnx_runtime_and_the_recorded_accuracy(client, name):
    """PNG-encoded test images, served, give the same classes as the file run directly in ONNX
    Runtime, and an accuracy consistent with the one model.json records for all 10,000."""
    if name not in client.app.state.services.repository.models:
        pytest.fail(f"{name} is not served: {client.app.state.services.repository.refused.get(name)}")
    test = load_split("test")
    chosen = np.random.default_rng(7).choice(len(test.labels), 400, replace=False)
    session = ort.InferenceSession(str(MODELS / name / "model.onnx"), providers=["CPUExecutionProvider"])
    direct = session.run(None, {"input": fashion_tensor(test.images[chosen], name)})[0].argmax(1)
    served = []
    for i in chosen:
        response = client.post(
            f"/classify?model={name}&top_k=1",
            content=png_bytes(Image.fromarray(test.images[i])),
            headers={"content-type": "image/png"},
        )
        served.append(response.json()["predictions"][0]["index"])
    assert served == direct.tolist()
    recorded = json.loads((MODELS / name / "model.json").read_text())["accuracy"]["top1"]
    accuracy = float(np.mean(np.array(served) == test.labels[chosen]))
    assert abs(accuracy - recorded) < 4 * np.sqrt(recorded * (1 - recorded) / len(chosen))


def test_a_12_megapixel_photo_is_classified_like_the_small_one(client, photos):
    big = Image.open(photos["chelsea"]).resize((4240, 2832), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=92)
    body = client.post("/classify", content=buffer.getvalue(), headers={"content-type": "image/jpeg"}).json()
    assert {p["index"] for p in body["predictions"][:3]} == {p["index"] for p in REFERENCE["chelsea"][:3]}
    assert body["predictions"][0]["index"] in DOMESTIC_CATS
