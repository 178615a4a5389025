"""What routes share: the services the app was built with, and the typed query parameters.

Routes call ``services(request)`` rather than declaring a FastAPI dependency: every dependency is
solved per request, and solving them was about a fifth of a LeNet-5 request's CPU time (measured
in-process: 383 us a request with them, 350 us without, together with the in-memory multipart
parser).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query, Request

from app.serving.preprocess import MEDIA_TYPES
from app.serving.services import Services
from app.serving.spec import NAME_PATTERN


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]  # set once by create_app


ModelName = Annotated[
    str | None,
    Query(alias="model", pattern=NAME_PATTERN, description="model name; default: the configured default"),
]

ModelPath = Annotated[str, Path(pattern=NAME_PATTERN, description="model name")]

ModelVersion = Annotated[
    str | None, Query(pattern=r"^[0-9]{1,9}$", description="model version; default: the newest served")
]

IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the image: multipart field 'file', or the raw body with an image/* content type",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            **{media: {"schema": {"type": "string", "format": "binary"}} for media in sorted(MEDIA_TYPES)},
        },
    }
}
