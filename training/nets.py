"""The lecture's networks, sized for 28x28 grayscale, registered by name.

Layers are named modules (``features.conv1``, ``inception3a.branch3x3.conv``...) because the ONNX
exporter carries these names into node names, and the service shows them to people.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {}


def register(name: str) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    def add(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        ARCHITECTURES[name] = factory
        return factory

    return add


def create(name: str) -> nn.Module:
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]()


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=True),
        )
    )


@register("lenet5")
class LeNet5(nn.Module):
    """LeCun et al. 1998: C1 (6@5x5, padded to keep 28x28), S2, C3 (16@5x5), S4, F5 120, F6 84.

    ReLU and max pooling stand in for the scaled tanh and trainable subsampling of the paper.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(1, 6, 5, padding=2),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(6, 16, 5),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(16 * 5 * 5, 120),
                relu3=nn.ReLU(),
                fc2=nn.Linear(120, 84),
                relu4=nn.ReLU(),
                fc3=nn.Linear(84, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register("alexnet")
class AlexNetStyle(nn.Module):
    """AlexNet's recipe at 28x28: five stacked convolutions with ReLU, three max pools, a dropout
    classifier of three linear layers. Batch norm (folded into the convolutions at export) stands
    in for local response normalisation."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv1=conv_bn_relu(1, 64, 5),
                pool1=nn.MaxPool2d(2),
                conv2=conv_bn_relu(64, 96, 3),
                pool2=nn.MaxPool2d(2),
                conv3=conv_bn_relu(96, 128, 3),
                conv4=conv_bn_relu(128, 128, 3),
                conv5=conv_bn_relu(128, 128, 3),
                pool3=nn.MaxPool2d(2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                drop1=nn.Dropout(0.5),
                fc1=nn.Linear(128 * 3 * 3, 512),
                relu1=nn.ReLU(inplace=True),
                drop2=nn.Dropout(0.5),
                fc2=nn.Linear(512, 256),
                relu2=nn.ReLU(inplace=True),
                fc3=nn.Linear(256, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class Inception(nn.Module):
    """GoogLeNet's module: 1x1, 1x1->3x3, 1x1->3x3->3x3 (the 5x5 factorised) and pool->1x1,
    concatenated along channels."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.branch1x1 = conv_bn_relu(cin, c1, 1)
        self.branch3x3 = nn.Sequential(OrderedDict(reduce=conv_bn_relu(cin, c3r, 1), conv=conv_bn_relu(c3r, c3, 3)))
        self.branch5x5 = nn.Sequential(
            OrderedDict(
                reduce=conv_bn_relu(cin, c5r, 1),
                conv_a=conv_bn_relu(c5r, c5, 3),
                conv_b=conv_bn_relu(c5, c5, 3),
            )
        )
        self.branch_pool = nn.Sequential(
            OrderedDict(pool=nn.MaxPool2d(3, stride=1, padding=1), proj=conv_bn_relu(cin, cp, 1))
        )
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1x1, self.branch3x3, self.branch5x5, self.branch_pool)
        return torch.cat([branch(x) for branch in branches], 1)


@register("googlenet")
class GoogLeNetStyle(nn.Module):
    """A stem, Inception modules at 14x14 and 7x7, global average pooling and a single linear
    layer: no fully connected stack, as in Szegedy et al. 2014."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(conv1=conv_bn_relu(1, 32, 3), conv2=conv_bn_relu(32, 64, 3)))
        self.pool1 = nn.MaxPool2d(2)
        self.inception3a = Inception(64, 32, 48, 64, 8, 16, 16)
        self.inception3b = Inception(128, 64, 64, 96, 16, 32, 32)
        self.pool2 = nn.MaxPool2d(2)
        self.inception4a = Inception(224, 96, 48, 104, 8, 24, 32)
        self.inception4b = Inception(256, 80, 56, 112, 12, 32, 32)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stem(x))
        x = self.pool2(self.inception3b(self.inception3a(x)))
        x = self.inception4b(self.inception4a(x))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


class BasicBlock(nn.Module):
    """He et al. 2015: two 3x3 convolutions and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                OrderedDict(conv=nn.Conv2d(cin, cout, 1, stride, bias=False), bn=nn.BatchNorm2d(cout))
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


@register("resnet")
class ResNetStyle(nn.Module):
    """ResNet for 28x28: a 3x3 stem, three stages of two basic blocks (28, 14 and 7 pixels),
    global average pooling and one linear layer."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        self.stem = conv_bn_relu(1, widths[0], 3)
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width)))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


LECTURE_KERNELS: dict[str, list[list[float]]] = {
    "blur": [[0, 1, 0], [1, 4, 1], [0, 1, 0]],
    "edge8": [[0, -1, 0], [-1, 8, -1], [0, -1, 0]],
    "edge4": [[0, -1, 0], [-1, 4, -1], [0, -1, 0]],
    "sobel_x": [[1, 0, -1], [2, 0, -2], [1, 0, -1]],
    "sobel_y": [[1, 2, 1], [0, 0, 0], [-1, -2, -1]],
}


@register("kernels")
class LectureKernels(nn.Module):
    """Fixed-weight convolution, one output channel per hand-made kernel of the lecture.

    It classifies nothing useful: its output is each kernel's mean absolute response, so that it
    still fits the classifier contract while /featuremaps shows the maps themselves. Like every
    CNN it computes the cross-correlation S(i,j) = sum_m sum_n I(i+m, j+n) K(m,n), zero-padded.
    """

    def __init__(self) -> None:
        super().__init__()
        weight = torch.tensor(list(LECTURE_KERNELS.values()), dtype=torch.float32).unsqueeze(1)
        self.conv = nn.Conv2d(1, len(LECTURE_KERNELS), 3, padding=1, bias=False)
        self.conv.weight = nn.Parameter(weight, requires_grad=False)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(torch.abs(self.conv(x))), 1)
