"""POST /explain: a saliency map by Grad-CAM, Score-CAM, Ablation-CAM, EigenCAM or occlusion; the
first convolution's kernels and the numbers the network is given, for the page's lecture view; the
test images that excite a channel most."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from app.http.deps import IMAGE_BODY, ModelName, ModelPath, services
from app.http.inputs import disconnect, image_reader
from app.http.routes.classify import ERRORS
from app.serving.schemas import InputResponse
from app.serving.service import ExplainRequest

router = APIRouter(tags=["feature maps"])
Method = Literal["gradcam", "scorecam", "ablationcam", "eigencam", "occlusion"]


@router.post(
    "/explain",
    responses={
        **ERRORS,
        200: {
            "content": {
                "image/png": {},
                "application/json": {"schema": {"$ref": "#/components/schemas/ExplainResponse"}},
            }
        },
    },
    openapi_extra=IMAGE_BODY,
    summary="Where in the image the evidence for a class lies, by the method asked for",
)
async def explain(
    request: Request,
    model: ModelName = None,
    method: Annotated[Method, Query()] = "gradcam",
    class_index: Annotated[int | None, Query(ge=0, description="default: the top-1 class")] = None,
    layer: Annotated[str | None, Query(max_length=200, description="default: the feature maps the head reads")] = None,
    format: Annotated[Literal["png", "json"], Query()] = "png",
    alpha: Annotated[float, Query(ge=0, le=1, description="png: opacity of the map over the photo")] = 0.5,
    window: Annotated[int | None, Query(ge=1, le=4096, description="occlusion: the grey square's side")] = None,
    stride: Annotated[int | None, Query(ge=1, le=4096, description="occlusion: the square's step")] = None,
) -> Response:
    asked = ExplainRequest(method, layer, class_index, format, alpha, window, stride)
    result = await services(request).service.explain(model, image_reader(request), asked, gone=disconnect(request))
    headers = {
        "X-Method": result.method,
        "X-Layer": result.layer or "",
        "X-Class-Index": str(result.class_index),
        "X-Class-Label": result.label.encode("ascii", "replace").decode(),
        "X-Class-Score": f"{result.score:.6f}",
    }
    return Response(result.body, media_type=result.media_type, headers=headers)


@router.get(
    "/models/{name}/kernels",
    responses={404: ERRORS[404], 200: {"content": {"image/png": {}, "application/json": {}}}},
    summary="The first convolution's kernels, from the model's weights: a picture or the numbers",
)
async def kernels(
    request: Request, name: ModelPath, format: Annotated[Literal["png", "json"], Query()] = "png"
) -> Response:
    body, media_type = await services(request).service.kernels(name, format)
    return Response(body, media_type=media_type)


@router.get(
    "/models/{name}/layers/{layer}/exemplars",
    responses={
        **{s: ERRORS[s] for s in (404, 422, 429, 503)},
        200: {"content": {"image/png": {}, "application/json": {}}},
    },
    summary="The Fashion-MNIST test images that excite a convolution channel most, with their patches",
)
async def exemplars(
    request: Request,
    name: ModelPath,
    layer: Annotated[str, Path(max_length=200, description="a convolution, as GET /models/{name}/layers names it")],
    channel: Annotated[int, Query(ge=0, description="the channel")] = 0,
    format: Annotated[Literal["json", "png"], Query(description="png: the patches in a 3 x 3 grid")] = "json",
) -> Response:
    body, media_type = await services(request).service.exemplars(name, layer, channel, format)
    return Response(body, media_type=media_type)


@router.post(
    "/explain/input",
    response_model=InputResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="The normalised tensor the network is given for an image (POST /preprocess shows it as a picture)",
)
async def given_values(request: Request, model: ModelName = None) -> Response:
    answer = await services(request).service.given_values(model, image_reader(request))
    return Response(answer.model_dump_json(), media_type="application/json")
