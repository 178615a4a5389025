"""What each layer sees: layer listings, tiled PNGs, JSON values checked against independent
computations, the lecture's kernels, class activation maps, and bad requests."""

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from app.config import Settings
from app.serving import preprocess as imaging

from ..conftest import MODELS, png_bytes, running_client

FASHION_MODELS = ["lenet5", "alexnet", "googlenet", "resnet"]


def served(client) -> list[str]:
    return sorted(client.app.state.services.repository.models)


def layers_of(client, model: str) -> list[dict]:
    response = client.get(f"/models/{model}/layers")
    assert response.status_code == 200, response.text
    return response.json()["layers"]


def maps(client, model: str, photo: bytes, **params) -> dict:
    query = "&".join(f"{k}={v}" for k, v in {"model": model, "format": "json", **params}.items())
    response = client.post(f"/featuremaps?{query}", files={"file": photo})
    assert response.status_code == 200, response.text
    return response.json()


def test_lenet5_stages_have_the_lectures_shapes(client):
    shapes = {layer["name"]: layer["output_shape"] for layer in layers_of(client, "lenet5")}
    assert shapes["features.conv1"] == [6, 28, 28]
    assert shapes["features.relu1"] == [6, 28, 28]
    assert shapes["features.pool1"] == [6, 14, 14]
    assert shapes["features.conv2"] == [16, 10, 10]
    assert shapes["features.pool2"] == [16, 5, 5]


def test_lenet5_layers_show_their_stages_and_parameter_counts(client):
    layers = {layer["name"]: layer for layer in layers_of(client, "lenet5")}
    conv1, conv2 = layers["features.conv1"], layers["features.conv2"]
    assert (conv1["stage"], conv1["kernel"], conv1["padding"], conv1["parameters"]) == (
        "convolution",
        [5, 5],
        [2, 2, 2, 2],
        156,
    )
    assert conv2["parameters"] == 16 * 6 * 5 * 5 + 16
    assert layers["features.relu1"]["stage"] == "detector" and layers["features.pool1"]["stage"] == "pooling"
    assert conv1["formula"] == "(N + 2P - F) / S + 1 = floor((28 + 2*2 - 5) / 1) + 1 = 28"


def test_the_lectures_formula_agrees_with_onnx_runtime_on_every_layer(client):
    checked = 0
    for model in served(client):
        for layer in layers_of(client, model):
            if layer["predicted_output"] is not None:
                assert layer["predicted_output"] == layer["output_shape"][1:], (model, layer["name"])
                checked += 1
    assert checked > 50


def test_block_ends_are_listed_for_residual_and_inception_networks(client):
    resnet = {layer["name"]: layer["operator"] for layer in layers_of(client, "resnet") if layer["stage"] == "block"}
    googlenet = {
        layer["name"]: layer["operator"] for layer in layers_of(client, "googlenet") if layer["stage"] == "block"
    }
    assert resnet["layer1.0.add"] == "Add"
    assert googlenet["inception3a.concat"] == "Concat"


@pytest.mark.parametrize("model", ["lenet5", "alexnet", "googlenet", "resnet", "kernels", "efficientnet_lite0"])
def test_every_listed_layer_renders_as_a_png(client, photos, model):
    photo = photos["chelsea"].read_bytes()
    for layer in layers_of(client, model):
        response = client.post(f"/featuremaps?model={model}&layer={layer['name']}&channels=0-3", files={"file": photo})
        assert response.status_code == 200, (layer["name"], response.text)
        picture = Image.open(io.BytesIO(response.content))
        assert picture.format == "PNG" and picture.width > 2 * min(4, layer["output_shape"][0]) - 1


def test_the_default_layer_is_the_first_convolution(client, photos):
    response = client.post("/featuremaps?model=lenet5", files={"file": photos["chelsea"].read_bytes()})
    assert response.headers["x-layer"] == "features.conv1" and response.headers["x-shape"] == "6,28,28"


def test_channels_are_tiled_in_a_near_square_grid_with_separators(client, photos):
    response = client.post(
        "/featuremaps?model=lenet5&layer=features.pool2&scale=4", files={"file": photos["chelsea"].read_bytes()}
    )
    picture = Image.open(io.BytesIO(response.content))
    assert picture.size == (4 * (5 * 4 + 1) + 1, 4 * (5 * 4 + 1) + 1)  # 16 channels: 4 x 4 tiles of 20 px


def cut_and_run(model: str, tensor: str, batch: np.ndarray, tmp_path) -> np.ndarray:
    """The same tensor computed independently: the graph cut at that tensor by onnx.utils."""
    cut = tmp_path / f"{model}-cut.onnx"
    onnx.utils.extract_model(str(MODELS / model / "model.onnx"), str(cut), ["input"], [tensor])
    return ort.InferenceSession(str(cut), providers=["CPUExecutionProvider"]).run(None, {"input": batch})[0]


@pytest.mark.parametrize(
    ("model", "layer_name"),
    [
        ("lenet5", "features.conv1"),
        ("lenet5", "features.pool2"),
        ("resnet", "layer2.1.add"),
        ("efficientnet_lite0", "_blocks.1._swish"),
    ],
)
def test_json_values_equal_the_tensor_from_a_cut_model(client, photos, tmp_path, model, layer_name):
    photo = photos["coffee"].read_bytes()
    body = maps(client, model, photo, layer=layer_name, values="true", channels="0-3")
    registry = client.app.state.services.repository
    layer = registry.models[model].analysis.layer(layer_name)
    batch = imaging.prepare(photo, registry.models[model].spec.input, 10**8)
    expected = cut_and_run(model, layer.tensor, batch, tmp_path)[0][:4]
    assert np.allclose(np.array(body["values"]), expected, atol=1e-4)
    assert [c["max"] for c in body["channels"]] == pytest.approx(expected.reshape(4, -1).max(1), abs=1e-4)


def correlate(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """S(i, j) = sum_m sum_n I(i + m, j + n) K(m, n), zero-padded to keep the size."""
    padded = np.pad(image, 1)
    h, w = image.shape
    return sum(kernel[m, n] * padded[m : m + h, n : n + w] for m in range(3) for n in range(3))


LECTURE_KERNELS = {  # the lecture's hand-made kernels, in the kernels model's channel order
    "blur": [[0, 1, 0], [1, 4, 1], [0, 1, 0]],
    "edge8": [[0, -1, 0], [-1, 8, -1], [0, -1, 0]],
    "edge4": [[0, -1, 0], [-1, 4, -1], [0, -1, 0]],
    "sobel_x": [[1, 0, -1], [2, 0, -2], [1, 0, -1]],
    "sobel_y": [[1, 2, 1], [0, 0, 0], [-1, -2, -1]],
}


def test_the_kernels_model_shows_the_lectures_correlations_of_a_photo(client, photos):
    photo = photos["astronaut"].read_bytes()
    body = maps(client, "kernels", photo, values="true")
    image = imaging.prepare(photo, client.app.state.services.repository.models["kernels"].spec.input, 10**8)[0, 0]
    for channel, kernel in enumerate(LECTURE_KERNELS.values()):
        assert np.allclose(body["values"][channel], correlate(image, np.array(kernel, np.float32)), atol=1e-4)


def test_sobel_lights_up_on_vertical_edges_only(client):
    edge = np.zeros((224, 224), np.uint8)
    edge[:, 112:] = 255
    body = maps(client, "kernels", png_bytes(Image.fromarray(edge)), values="true")
    sobel_x, sobel_y = np.abs(body["values"][3]), np.abs(body["values"][4])
    assert sobel_x[:, 111:113].min() > 1.0 and sobel_x[:, 20:100].max() == 0
    assert sobel_y[5:-5].max() == 0


def test_class_activation_map_is_drawn_for_the_top1_class(client, photos):
    photo = photos["chelsea"].read_bytes()
    top1 = client.post("/classify", files={"file": photo}).json()["predictions"][0]
    response = client.post("/cam", files={"file": photo})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert int(response.headers["x-class-index"]) == top1["index"]
    assert float(response.headers["x-class-score"]) == pytest.approx(top1["score"], abs=1e-5)
    assert Image.open(io.BytesIO(response.content)).size == (224, 224)


def test_class_activation_map_for_a_named_class(client, photos):
    response = client.post("/cam?model=resnet&class_index=3", files={"file": photos["chelsea"].read_bytes()})
    assert response.status_code == 200 and response.headers["x-class-label"] == "Dress"


def test_models_say_which_support_class_activation_maps(client):
    cam = {m["name"]: m["cam"] for m in client.get("/models").json()["models"]}
    assert cam["efficientnet_lite0"] and cam["googlenet"] and cam["resnet"]
    assert not cam["lenet5"] and not cam["alexnet"] and not cam["kernels"]


def test_cam_for_a_model_without_one_is_404(client, photos):
    response = client.post("/cam?model=lenet5", files={"file": photos["chelsea"].read_bytes()})
    assert response.status_code == 404 and "global average pooling" in response.json()["detail"]


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("model=lenet5&layer=features.conv9", 404),
        ("model=lenet5&channels=0-6", 422),
        ("model=lenet5&channels=5-2", 422),
        ("model=lenet5&channels=abc", 422),
        ("model=efficientnet_lite0&layer=_bn1&channels=0-1279", 422),
        ("model=lenet5&format=svg", 422),
        ("model=lenet5&scale=99", 422),
        ("model=lenet5&colormap=rainbow", 422),
        ("model=nosuch", 404),
    ],
)
def test_bad_feature_map_requests_are_4xx(client, photos, query, status):
    response = client.post(f"/featuremaps?{query}", files={"file": photos["chelsea"].read_bytes()})
    assert response.status_code == status, response.text
    assert "detail" in response.json()


def test_too_many_values_are_refused_with_advice(client, photos):
    response = client.post(
        "/featuremaps?model=kernels&format=json&values=true", files={"file": photos["chelsea"].read_bytes()}
    )
    assert response.status_code == 200
    small = Settings(models_dir=MODELS, max_feature_values=1000)
    with running_client(small) as limited:
        refused = limited.post(
            "/featuremaps?model=kernels&format=json&values=true", files={"file": photos["chelsea"].read_bytes()}
        )
        assert refused.status_code == 422 and "fewer channels" in refused.json()["detail"]


def unnamed_model(folder) -> None:
    """Conv -> Relu -> MaxPool -> Conv -> Add (residual) -> GlobalAveragePool -> Flatten -> Gemm,
    with no node names and no exporter metadata, as some converters write them."""
    rng = np.random.default_rng(1)
    init = [
        numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
        for n, s in (("w1", (4, 1, 3, 3)), ("w2", (4, 4, 3, 3)), ("fc", (3, 4)), ("b", (3,)))
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["t1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t1"], ["t2"]),
        helper.make_node("MaxPool", ["t2"], ["t3"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["t3", "w2"], ["t4"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["t4", "t3"], ["t5"]),
        helper.make_node("GlobalAveragePool", ["t5"], ["t6"]),
        helper.make_node("Flatten", ["t6"], ["t7"]),
        helper.make_node("Gemm", ["t7", "fc", "b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir()
    onnx.save(model, folder / "model.onnx")
    import hashlib
    import json

    spec = {
        "name": folder.name,
        "input": {"name": "x", "color": "L", "height": 16, "width": 16, "mean": [0], "std": [255]},
        "output": {"name": "y", "kind": "logits"},
        "labels": ["a", "b", "c"],
        "source": {"architecture": "converted", "dataset": "none"},
        "sha256": hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest(),
    }
    (folder / "model.json").write_text(json.dumps(spec))


def test_a_third_party_model_with_unnamed_layers_lists_and_renders(tmp_path, photos):
    unnamed_model(tmp_path / "converted")
    with running_client(Settings(models_dir=tmp_path, default_model="converted")) as client:
        layers = layers_of(client, "converted")
        assert [(layer["name"], layer["stage"]) for layer in layers] == [
            ("Conv_0", "convolution"),
            ("Relu_1", "detector"),
            ("MaxPool_2", "pooling"),
            ("Conv_3", "convolution"),
            ("Add_4", "block"),
            ("GlobalAveragePool_5", "pooling"),
        ]
        for layer in layers:
            response = client.post(f"/featuremaps?layer={layer['name']}", files={"file": photos["coffee"].read_bytes()})
            assert response.status_code == 200
        assert client.post("/cam", files={"file": photos["coffee"].read_bytes()}).status_code == 200


def test_classify_keeps_its_own_session_without_promoted_outputs(client, photos):
    client.post("/featuremaps?model=lenet5", files={"file": photos["chelsea"].read_bytes()})
    model = client.app.state.services.repository.models["lenet5"]
    assert model.featuremaps.built
    assert [o.name for o in model.session.get_outputs()] == ["logits"]
