"""What the HTTP API sends back, typed so that /docs shows clients exactly what to expect."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.spec import Accuracy, InputSpec, Source


class Prediction(BaseModel):
    index: int = Field(description="class index in the model's output")
    label: str
    score: float = Field(description="softmax probability")


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction] = Field(description="best first")


class ModelInfo(BaseModel):
    name: str
    status: Literal["ready", "failed"]
    reason: str | None = Field(None, description="why a failed model was refused")
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


class ModelList(BaseModel):
    default_model: str
    models: list[ModelInfo]


class Health(BaseModel):
    status: str
    models_loaded: int = 0
    models_failed: int = 0


class ErrorBody(BaseModel):
    detail: str | list = Field(description="what was wrong, and what is allowed")
