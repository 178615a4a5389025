"""What each layer sees: GET /models/{name}/layers, POST /featuremaps and POST /cam."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app import imaging, render
from app.deps import IMAGE_BODY, ModelName, RegistryDep, SettingsDep, image_bytes, lookup_model
from app.errors import ApiError
from app.featuremaps import FeatureMapSession
from app.graph import Layer
from app.registry import LoadedModel
from app.routes.classify import ERRORS
from app.schemas import ChannelStats, FeatureMapResponse, LayerInfo, LayerList
from app.spec import NAME_PATTERN

router = APIRouter(tags=["feature maps"])
CHANNELS_PATTERN = r"^\d+(-\d+)?(,\d+(-\d+)?)*$"


async def session_of(model: LoadedModel) -> FeatureMapSession:
    if model.featuremaps is None:
        raise ApiError(404, f"model {model.name!r} offers no feature maps (disabled, or its graph could not be read)")
    return await model.batcher.call(model.featuremaps.get)


def describe_layer(layer: Layer, session: FeatureMapSession) -> LayerInfo:
    predicted = session.predicted(layer)
    input_shape = session.shapes.get(layer.input_tensor)
    return LayerInfo(
        name=layer.name,
        operator=layer.operator,
        stage=layer.stage,
        output_shape=list(session.shapes[layer.tensor]),
        input_shape=list(input_shape) if input_shape and layer.kernel is not None else None,
        kernel=_list(layer.kernel),
        stride=_list(layer.stride),
        padding=_list(layer.padding),
        dilation=_list(layer.dilation),
        groups=layer.groups,
        parameters=layer.parameters,
        folded_batchnorm=layer.folded_batchnorm,
        predicted_output=list(predicted) if predicted else None,
        formula=formula(layer, input_shape, predicted),
    )


def _list(values: tuple[int, ...] | None) -> list[int] | None:
    return list(values) if values is not None else None


def formula(layer: Layer, input_shape: tuple[int, ...] | None, predicted: tuple[int, int] | None) -> str | None:
    """The lecture's formula with this layer's numbers, for the height axis."""
    if predicted is None or input_shape is None or layer.auto_pad != "NOTSET":
        return None
    n, f, s, d = input_shape[-2], layer.kernel[0], layer.stride[0], layer.dilation[0]
    top, bottom = layer.padding[0], layer.padding[len(layer.kernel)]
    pad = f"2*{top}" if top == bottom else f"{top}+{bottom}"
    span = f if d == 1 else f"{d}*({f}-1)+1"
    rounding = "ceil" if layer.ceil_mode else "floor"
    return f"(N + 2P - F) / S + 1 = {rounding}(({n} + {pad} - {span}) / {s}) + 1 = {predicted[0]}"


def parse_channels(text: str | None, available: int, limit: int) -> list[int]:
    if text is None:
        return list(range(min(available, limit)))
    chosen: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if low > high:
            raise ApiError(422, f"channel range {part!r} runs backwards")
        if high >= available:
            raise ApiError(422, f"channel {high} does not exist: this layer has channels 0-{available - 1}")
        chosen.update(range(low, high + 1))
        if len(chosen) > limit:
            raise ApiError(422, f"at most {limit} channels per request; ask for a range such as 0-{limit - 1}")
    return sorted(chosen)


def pick_layer(session: FeatureMapSession, name: str | None) -> Layer:
    layer = session.analysis.layer(name) if name else session.analysis.default_layer
    if layer is None:
        known = [layer.name for layer in session.analysis.layers]
        raise ApiError(404, f"unknown layer {name!r}; GET /models/{session.spec.name}/layers lists them: {known[:20]}")
    return layer


@router.get("/models/{name}/layers", response_model=LayerList, responses={404: ERRORS[404]})
async def list_layers(
    registry: RegistryDep, settings: SettingsDep, name: str = Path(pattern=NAME_PATTERN)
) -> LayerList:
    model = registry.models.get(name)
    if model is None:
        raise ApiError(404, f"unknown model {name!r}; served models: {sorted(registry.models)}")
    session = await session_of(model)
    spec = model.spec.input
    return LayerList(
        model=name,
        input_shape=[spec.channels, spec.height, spec.width],
        cam=session.analysis.cam is not None,
        layers=[describe_layer(layer, session) for layer in session.analysis.layers],
    )


@router.post(
    "/featuremaps",
    responses={
        **ERRORS,
        200: {
            "content": {
                "image/png": {},
                "application/json": {"schema": {"$ref": "#/components/schemas/FeatureMapResponse"}},
            }
        },
    },
    openapi_extra=IMAGE_BODY,
    summary="The activations of one layer, as a tiled PNG or as numbers",
)
async def featuremaps(
    request: Request,
    settings: SettingsDep,
    model_name: ModelName = None,
    layer: Annotated[str | None, Query(max_length=200, description="default: the first convolution")] = None,
    format: Annotated[Literal["png", "json"], Query()] = "png",
    channels: Annotated[
        str | None, Query(pattern=CHANNELS_PATTERN, max_length=200, description="e.g. 0-15 or 0,3,8-11")
    ] = None,
    colormap: Annotated[
        Literal["auto", *render.COLORMAPS], Query(description="auto: coolwarm for signed maps, else gray")
    ] = "auto",
    scale: Annotated[int, Query(ge=0, le=render.MAX_UPSCALE, description="upscaling factor; 0 picks one")] = 0,
    values: Annotated[bool, Query(description="json: include the maps' values")] = False,
) -> Response:
    model = lookup_model(request, model_name)
    image = await image_bytes(request)
    session = await session_of(model)
    chosen_layer = pick_layer(session, layer)
    shape = session.shapes[chosen_layer.tensor]
    picked = parse_channels(channels, shape[0], settings.max_feature_channels)
    batch = await imaging.prepare_off_loop(image, model.spec.input, settings.max_pixels)
    (maps,) = await model.batcher.call(session.run, batch, [chosen_layer.tensor])
    maps = maps[0][picked]
    info = describe_layer(chosen_layer, session)
    if format == "json":
        return json_maps(model.name, info, shape, picked, maps, values, settings.max_feature_values)
    signed = bool((maps < 0).any())
    name = colormap if colormap != "auto" else ("coolwarm" if signed else "gray")
    upscale = scale or render.auto_upscale(*maps.shape[1:])
    pixels = await run_in_threadpool(render.tile, maps, name, upscale, name in render.DIVERGING)
    headers = {
        "X-Layer": chosen_layer.name,
        "X-Shape": ",".join(map(str, shape)),
        "X-Channels": ",".join(map(str, picked)) if len(picked) <= 64 else f"{picked[0]}-{picked[-1]}",
    }
    return Response(render.png(pixels), media_type="image/png", headers=headers)


def json_maps(
    model: str, info: LayerInfo, shape, picked: list[int], maps: np.ndarray, values: bool, limit: int
) -> Response:
    if values and maps.size > limit:
        raise ApiError(422, f"{maps.size} values asked for, the limit is {limit}; choose fewer channels")
    stats = [
        ChannelStats(index=c, min=float(m.min()), max=float(m.max()), mean=float(m.mean()))
        for c, m in zip(picked, maps, strict=True)
    ]
    body = FeatureMapResponse(
        model=model, layer=info, shape=list(shape), channels=stats, values=maps.tolist() if values else None
    )
    return Response(body.model_dump_json(), media_type="application/json")


@router.post(
    "/cam",
    responses={**ERRORS, 200: {"content": {"image/png": {}}}},
    openapi_extra=IMAGE_BODY,
    summary="Class activation map: where in the image the evidence for a class lies",
)
async def cam(
    request: Request,
    settings: SettingsDep,
    model_name: ModelName = None,
    class_index: Annotated[int | None, Query(ge=0, description="default: the top-1 class")] = None,
    alpha: Annotated[float, Query(ge=0, le=1, description="opacity of the map over the photo")] = 0.5,
) -> Response:
    model = lookup_model(request, model_name)
    image = await image_bytes(request)
    session = await session_of(model)
    head = session.analysis.cam
    if head is None:
        raise ApiError(
            404,
            f"model {model.name!r} has no class activation map: it needs global average pooling "
            "followed by one linear layer",
        )
    if class_index is not None and class_index >= len(model.spec.labels):
        raise ApiError(422, f"class_index must be below {len(model.spec.labels)}")
    photo = await run_in_threadpool(imaging.fit, image, model.spec.input, settings.max_pixels)
    batch = imaging.to_tensor(photo, model.spec.input)
    features, logits = await model.batcher.call(session.run, batch, [head.features, model.spec.output.name])
    chosen = int(logits[0].argmax()) if class_index is None else class_index
    heat = np.maximum(np.tensordot(head.weights[chosen], features[0], axes=1), 0)
    heat = heat / heat.max() if heat.max() > 0 else heat
    picture = await run_in_threadpool(render.overlay, photo, heat, alpha)
    scores = np.exp(logits[0] - logits[0].max()) if model.spec.output.kind == "logits" else logits[0]
    headers = {
        "X-Class-Index": str(chosen),
        "X-Class-Label": model.spec.labels[chosen].encode("ascii", "replace").decode(),
        "X-Class-Score": f"{float(scores[chosen] / scores.sum()):.6f}",
    }
    return Response(render.png(picture), media_type="image/png", headers=headers)
