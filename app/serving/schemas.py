"""What the service answers, typed: every adapter renders these, and /docs shows them to clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from app.serving.spec import Accuracy, InputSpec, Source


class Prediction(BaseModel):
    index: int = Field(description="class index in the model's output")
    label: str
    score: float = Field(description="softmax probability")


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction] = Field(description="best first")


class ServingPlan(BaseModel):
    """What app/sizing.py gave the model in this server process."""

    processes: int = Field(description="server processes, each holding every model")
    cpus: int = Field(description="this process's share of the CPUs")
    threads: int = Field(description="ONNX Runtime intra-op threads per inference")
    workers: int = Field(description="batches run at once")
    decode: Literal["worker", "pool"] = Field(description="where images over 64x64 are decoded")
    capacity: int = Field(description="images admitted at once; beyond them 429")
    padded_batch: int | None = Field(description="every batch run at this size (on an accelerator)")
    alone_threads: int = Field(description="threads of a batch that is all there is in flight; 0: no such session")
    inline_batch: int = Field(description="batches up to this size run on the event loop; 0: never")
    max_batch_size: int
    max_queue: int


class VersionStatus(BaseModel):
    version: str
    status: Literal["ready", "failed"]
    reason: str | None = Field(
        None, description="why this version is not served, or why a new copy of a served one was refused"
    )


class ModelInfo(BaseModel):
    name: str
    status: Literal["ready", "failed"]
    reason: str | None = Field(None, description="why a failed model was refused")
    version: str | None = Field(None, description="the version a request that names none gets (the newest served)")
    versions: list[VersionStatus] = Field(
        default_factory=list, description="versions served, newest first, and versions refused"
    )
    description: str | None = None
    input: InputSpec | None = None
    labels: int | None = Field(None, description="number of classes")
    provider: str | None = Field(None, description="the execution provider the session actually got")
    providers: list[str] | None = None
    accuracy: Accuracy | None = None
    source: Source | None = None
    sha256: str | None = None
    load_seconds: float | None = None
    default: bool = False
    layers: int | None = Field(None, description="layers /featuremaps can show")
    cam: bool = Field(False, description="whether /cam can draw a class activation map")
    serving: ServingPlan | None = None


class ModelList(BaseModel):
    default_model: str
    models: list[ModelInfo]


class LayerInfo(BaseModel):
    name: str = Field(description="PyTorch module path where the exporter kept it, else the ONNX node name")
    operator: str = Field(description="ONNX operator")
    stage: Literal["convolution", "detector", "pooling", "block"]
    output_shape: list[int] = Field(description="channels, height, width for one image")
    input_shape: list[int] | None = None
    kernel: list[int] | None = None
    stride: list[int] | None = None
    padding: list[int] | None = Field(None, description="ONNX order: top, left, bottom, right")
    dilation: list[int] | None = None
    groups: int | None = None
    parameters: int | None = Field(None, description="weights plus biases of a convolution")
    folded_batchnorm: bool = False
    predicted_output: list[int] | None = Field(None, description="height, width from (N + 2P - F) / S + 1")
    formula: str | None = None
    methods: list[str] = Field(
        default_factory=list, description="the /explain methods that take this layer (occlusion needs none)"
    )
    passes: dict[str, int] = Field(default_factory=dict, description="forward passes each method costs here")


class LayerList(BaseModel):
    model: str
    input_shape: list[int]
    cam: bool = Field(description="whether /cam can draw a class activation map for this model")
    layers: list[LayerInfo]
    methods: list[str] = Field(default_factory=list, description="the /explain methods this model offers")
    explain_layer: str | None = Field(None, description="the layer /explain uses when none is named")
    explain_layers: dict[str, str] = Field(
        default_factory=dict,
        description="per method, the layer /explain uses when none is named: the deepest whose passes fit max_passes",
    )
    max_passes: int | None = Field(None, description="most forward passes one /explain request may cost")


class KernelResponse(BaseModel):
    model: str
    layer: LayerInfo
    shape: list[int] = Field(description="output channels, input channels per group, height, width")
    weights: list[list[list[list[float]]]]
    bias: list[float] | None = None


class Exemplar(BaseModel):
    index: int = Field(description="the Fashion-MNIST test image's index")
    activation: float = Field(description="the channel's largest value on this image (before the ReLU)")
    position: list[int] = Field(description="y, x of that value in the layer's output")
    box: list[int] = Field(description="its receptive field in the 28x28 image: top, left, bottom, right (exclusive)")
    patch: str = Field(description="the image inside the box, a PNG data URL")
    image: str = Field(description="the whole test image, a PNG data URL")


class ExemplarResponse(BaseModel):
    model: str
    layer: str
    channel: int
    channels: int = Field(description="the layer's channel count")
    receptive_field: int = Field(description="side of one position's receptive field, before clipping")
    exemplars: list[Exemplar] = Field(description="the test images that excite the channel most, best first")


class InputResponse(BaseModel):
    model: str
    shape: list[int] = Field(description="channels, height, width of the tensor the model is given")
    mean: list[float] = Field(description="per channel, subtracted from the 0-255 pixels")
    std: list[float] = Field(description="per channel, the pixels divided by it after the mean")
    values: list[list[list[float]]] = Field(description="the normalised tensor, channels first")


class ExplainResponse(BaseModel):
    model: str
    method: str
    layer: str | None = Field(description="the layer explained; null for occlusion, which works on the input")
    class_index: int
    label: str
    score: float = Field(description="the class's probability on the unaltered image")
    shape: list[int] = Field(description="height, width of the model's input")
    map: list[list[float]] = Field(description="importance over the model's input (after resize and crop), in [0, 1]")


class ChannelStats(BaseModel):
    index: int
    min: float
    max: float
    mean: float


class FeatureMapResponse(BaseModel):
    model: str
    layer: LayerInfo
    shape: list[int] = Field(description="the whole layer: channels, height, width")
    channels: list[ChannelStats]
    values: list[list[list[float]]] | None = Field(None, description="the chosen channels' maps, with values=true")


@dataclass(frozen=True)
class Tensor:
    """One input or output as the model's session declares it; -1 stands for a symbolic dimension."""

    name: str
    element_type: str  # ONNX Runtime's, e.g. "tensor(float)"
    shape: tuple[int, ...]
