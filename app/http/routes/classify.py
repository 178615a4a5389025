"""POST /classify: an image in, the top-k classes with softmax probabilities out."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from app.http.deps import IMAGE_BODY, ModelName, ModelVersion, services
from app.http.inputs import disconnect, image_reader
from app.http.schemas import ErrorBody
from app.serving.schemas import ClassifyResponse

router = APIRouter(tags=["inference"])

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "undecodable image",
        404: "unknown model",
        413: "body or image too large",
        415: "unsupported media type",
        422: "bad parameters",
        429: "the model's queue is full: retry after Retry-After seconds",
        503: "model not ready, or the request waited past its deadline",
    }.items()
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="Classify an image: top-k labels with scores",
)
async def classify(
    request: Request,
    model: ModelName = None,
    top_k: Annotated[int, Query(ge=1, description="how many classes (at most the model's)")] = 5,
    version: ModelVersion = None,
) -> Response:
    """The answer is serialised here, once, by pydantic's own encoder: handing FastAPI the model
    would have it validated again and re-encoded (12% of the event loop's time per LeNet-5 request)."""
    image = image_reader(request)
    answer = await services(request).service.classify(model, image, top_k, version=version, gone=disconnect(request))
    return Response(answer.model_dump_json(), media_type="application/json")
