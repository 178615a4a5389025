"""Errors as types, turned into JSON ``{"detail": ...}`` responses in one place.

Anything a client sent gets a 4xx that says what was wrong; only our own faults are 500s.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.batching import DeadlineExceeded, Overloaded
from app.disconnect import CLIENT_CLOSED_REQUEST, ClientGone
from app.imaging import ImageRejected
from app.v2 import V2Error

log = logging.getLogger("cnnserve.errors")


class ApiError(HTTPException):
    """Raised by routes and dependencies with the status a client can act on."""


def not_found(detail: str) -> ApiError:
    return ApiError(404, detail)


async def image_rejected(request: Request, error: ImageRejected) -> JSONResponse:
    return JSONResponse({"detail": error.detail}, status_code=error.status)


async def overloaded(request: Request, error: Overloaded) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=429, headers={"Retry-After": str(error.retry_after)})


async def deadline_exceeded(request: Request, error: DeadlineExceeded) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": "1"})


async def client_gone(request: Request, error: ClientGone) -> JSONResponse:
    return JSONResponse({"detail": "the client closed the connection"}, status_code=CLIENT_CLOSED_REQUEST)


async def v2_error(request: Request, error: V2Error) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)


async def unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ImageRejected, image_rejected)
    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(DeadlineExceeded, deadline_exceeded)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(V2Error, v2_error)
    app.add_exception_handler(Exception, unexpected)
