"""What only the HTTP API sends back (the service's own answers are in app/serving/schemas.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.serving.schemas import ChannelStats, LayerInfo


class Health(BaseModel):
    status: str
    models_loaded: int = 0
    models_failed: int = 0


class ErrorBody(BaseModel):
    detail: str | list[Any] = Field(description="what was wrong, and what is allowed")


class FeatureMapResponse(BaseModel):
    model: str
    layer: LayerInfo
    shape: list[int] = Field(description="the whole layer: channels, height, width")
    channels: list[ChannelStats]
    values: list[list[list[float]]] | None = Field(None, description="the chosen channels' maps, with values=true")
