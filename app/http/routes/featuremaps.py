"""What each layer sees: GET /models/{name}/layers, POST /featuremaps, POST /preprocess and POST /cam."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from app.http.deps import IMAGE_BODY, ModelName, ModelPath, ModelVersion, services
from app.http.inputs import disconnect, image_reader
from app.http.routes.classify import ERRORS
from app.serving.inspect import render
from app.serving.schemas import LayerList
from app.serving.service import FeatureMapView

router = APIRouter(tags=["feature maps"])
CHANNELS_PATTERN = r"^\d+(-\d+)?(,\d+(-\d+)?)*$"
MAX_LISTED_CHANNELS = 64  # beyond this X-Channels gives the range
if TYPE_CHECKING:
    Colormap = str  # a type checker cannot read a Literal built at run time
else:
    Colormap = Literal["auto", *render.COLORMAPS]


@router.get("/models/{name}/layers", response_model=LayerList, responses={404: ERRORS[404]})
async def list_layers(request: Request, name: ModelPath) -> LayerList:
    return await services(request).service.layers(name)


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
    model: ModelName = None,
    layer: Annotated[str | None, Query(max_length=200, description="default: the first convolution")] = None,
    format: Annotated[Literal["png", "json"], Query()] = "png",
    channels: Annotated[
        str | None, Query(pattern=CHANNELS_PATTERN, max_length=200, description="e.g. 0-15 or 0,3,8-11")
    ] = None,
    colormap: Annotated[Colormap, Query(description="auto: coolwarm for signed maps, else gray")] = "auto",
    scale: Annotated[int, Query(ge=0, le=render.MAX_UPSCALE, description="upscaling factor; 0 picks one")] = 0,
    values: Annotated[bool, Query(description="json: include the maps' values")] = False,
) -> Response:
    view = FeatureMapView(format=format, colormap=colormap, scale=scale, values=values)
    maps = await services(request).service.featuremaps(
        model, image_reader(request), layer=layer, channels=channels, view=view, gone=disconnect(request)
    )
    if maps.media_type == "application/json":
        return Response(maps.body, media_type=maps.media_type)
    listed = maps.channels if len(maps.channels) <= MAX_LISTED_CHANNELS else []
    headers = {
        "X-Layer": maps.layer.name,
        "X-Shape": ",".join(map(str, maps.shape)),
        "X-Channels": ",".join(map(str, listed)) if listed else f"{maps.channels[0]}-{maps.channels[-1]}",
    }
    return Response(maps.body, media_type=maps.media_type, headers=headers)


@router.post(
    "/preprocess",
    responses={**ERRORS, 200: {"content": {"image/png": {}}}},
    openapi_extra=IMAGE_BODY,
    summary="What the network is given: the image after the model's preprocessing, before mean and std",
)
async def preprocess(request: Request, model: ModelName = None, version: ModelVersion = None) -> Response:
    png = await services(request).service.given(model, image_reader(request), version=version)
    return Response(png, media_type="image/png")


@router.post(
    "/cam",
    responses={**ERRORS, 200: {"content": {"image/png": {}}}},
    openapi_extra=IMAGE_BODY,
    summary="Class activation map: where in the image the evidence for a class lies",
)
async def cam(
    request: Request,
    model: ModelName = None,
    class_index: Annotated[int | None, Query(ge=0, description="default: the top-1 class")] = None,
    alpha: Annotated[float, Query(ge=0, le=1, description="opacity of the map over the photo")] = 0.5,
) -> Response:
    image = image_reader(request)
    result = await services(request).service.cam(
        model, image, class_index=class_index, alpha=alpha, gone=disconnect(request)
    )
    headers = {
        "X-Class-Index": str(result.class_index),
        "X-Class-Label": result.label.encode("ascii", "replace").decode(),
        "X-Class-Score": f"{result.score:.6f}",
    }
    return Response(result.png, media_type="image/png", headers=headers)
