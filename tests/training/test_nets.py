import numpy as np
import pytest
import torch

from training import nets


@pytest.mark.parametrize("arch", ["lenet5", "alexnet", "googlenet", "resnet"])
def test_each_architecture_maps_28x28_grayscale_to_ten_logits(arch):
    model = nets.create(arch).eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_lenet5_stages_have_the_papers_shapes():
    features = nets.create("lenet5").features
    x, shapes = torch.zeros(1, 1, 28, 28), {}
    for name, layer in features.named_children():
        x = layer(x)
        shapes[name] = tuple(x.shape[1:])
    assert shapes["conv1"] == (6, 28, 28) and shapes["pool1"] == (6, 14, 14)
    assert shapes["conv2"] == (16, 10, 10) and shapes["pool2"] == (16, 5, 5)


def test_googlenet_has_no_fully_connected_stack():
    linears = [m for m in nets.create("googlenet").modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1


def test_resnet_blocks_add_their_shortcut():
    block = nets.BasicBlock(4, 8, stride=2).eval()
    x = torch.randn(1, 4, 8, 8)
    residual = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
    assert torch.allclose(block(x), torch.relu(residual + block.shortcut(x)))


def test_kernels_model_computes_the_lectures_cross_correlation():
    image = np.random.default_rng(0).random((9, 11)).astype(np.float32)
    conv = nets.create("kernels").conv
    with torch.no_grad():
        maps = conv(torch.from_numpy(image)[None, None])[0].numpy()
    padded = np.pad(image, 1)
    for channel, kernel in enumerate(nets.LECTURE_KERNELS.values()):
        kernel = np.array(kernel, np.float32)
        expected = [[(padded[i : i + 3, j : j + 3] * kernel).sum() for j in range(11)] for i in range(9)]
        assert np.allclose(maps[channel], expected, atol=1e-5)


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(KeyError, match="lenet5"):
        nets.create("vgg")
