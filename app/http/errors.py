"""Every error the HTTP API answers, rendered in one place.

The body's shape follows the protocol of the path: ``{"error": ...}`` under ``/v2``, as the Open
Inference Protocol and Triton's clients expect, for every status (401, 413 and 422 included), and
``{"detail": ...}`` everywhere else, as FastAPI's own validation errors are. Only our own faults
are 500s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import Send

from app.serving.errors import ServingError

log = logging.getLogger("cnnserve.errors")

V2_PREFIX = "/v2"


def body_key(path: str) -> str:
    return "error" if path == V2_PREFIX or path.startswith(V2_PREFIX + "/") else "detail"


def rendered(path: str, status: int, message: Any, headers: Mapping[str, str] | None = None) -> JSONResponse:
    key = body_key(path)
    if key == "error" and not isinstance(message, str):  # a validation error list reads as one line
        message = "; ".join(_validation_line(item) for item in message)
    return JSONResponse({key: message}, status_code=status, headers=dict(headers or {}))


def _validation_line(item: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in item.get("loc", ()))
    return f"{where}: {item.get('msg', item)}"


async def send_error(path: str, send: Send, error: ServingError, extra: Mapping[str, str] | None = None) -> None:
    """For middleware that answers before any route runs (API key, body limit)."""
    response = rendered(path, error.status, error.message, {**error.headers, **(extra or {})})
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


async def handle(request: Request, error: Exception) -> JSONResponse:
    """The one handler, for our errors, FastAPI's validation errors, Starlette's 404/405, and the rest."""
    path = request.url.path
    if isinstance(error, ServingError):
        return rendered(path, error.status, error.message, error.headers)
    if isinstance(error, RequestValidationError):
        return rendered(path, 422, jsonable_encoder(error.errors()))
    if isinstance(error, HTTPException):
        return rendered(path, error.status_code, error.detail, error.headers)
    log.exception("unhandled error on %s %s", request.method, path)
    return rendered(path, 500, "internal server error")


def install(app: FastAPI) -> None:
    for kind in (ServingError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, handle)
