"""What only the HTTP API sends back (the service's own answers are in app/serving/schemas.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str
    models_loaded: int = 0
    models_failed: int = 0


class ErrorBody(BaseModel):
    """Under /v2 the same text comes as ``{"error": ...}``, as the Open Inference Protocol has it."""

    detail: str | list[Any] = Field(description="what was wrong, and what is allowed")
