"""POST /classify: an image in, the top-k classes with softmax probabilities out."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from app import imaging
from app.deps import IMAGE_BODY, ModelName, image_bytes, lookup_model
from app.disconnect import unless_disconnected
from app.errors import ApiError
from app.schemas import ClassifyResponse, ErrorBody, Prediction

router = APIRouter(tags=["inference"])

ERRORS = {
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


def top_k(logits: np.ndarray, kind: str, k: int, labels: list[str]) -> list[Prediction]:
    """Softmax (in float64, shifted by the max) unless the model already outputs probabilities."""
    scores = logits.astype(np.float64)
    if kind == "logits":
        scores = np.exp(scores - scores.max())
        scores /= scores.sum()
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return [Prediction(index=int(i), label=labels[i], score=float(scores[i])) for i in best]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="Classify an image: top-k labels with scores",
)
async def classify(
    request: Request,
    model_name: ModelName = None,
    top_k_: Annotated[int, Query(alias="top_k", ge=1, description="how many classes (at most the model's)")] = 5,
) -> ClassifyResponse:
    settings = request.app.state.settings
    if top_k_ > settings.max_top_k:
        raise ApiError(422, f"top_k must be at most {settings.max_top_k}")
    model = lookup_model(request, model_name)
    image = await image_bytes(request)
    with model.batcher.admission():
        work = imaging.checked(image, model.spec.input, settings.max_pixels)
        if callable(work) and not model.decodes_on_workers:
            work = await run_in_threadpool(work)
        logits = await unless_disconnected(request, model.infer(work))
    predictions = top_k(logits[0], model.spec.output.kind, top_k_, model.spec.labels)
    return ClassifyResponse(model=model.name, predictions=predictions)
