"""What a request brings: the image (multipart field ``file`` or a raw ``image/*`` body), read only
when the service has admitted the request, and the signal that its client has gone."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from urllib.parse import parse_qsl

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.types import Scope

from app.http.multipart import read_part
from app.serving.errors import ClientGone, InvalidParameter, UnsupportedMediaType
from app.serving.preprocess import FORMATS, MEDIA_TYPES

OCTET_STREAM = "application/octet-stream"


def query_value(scope: Scope, key: str) -> str | None:
    """The last ``key`` of the query string, decoded as Starlette decodes it for a route's
    parameter (FastAPI reads the last of a repeated one): for middleware, which runs before a
    route's parameters are parsed."""
    query = scope.get("query_string", b"").decode("latin-1")
    if key not in query and "%" not in query:  # the common case, without parsing
        return None
    found = [value for name, value in parse_qsl(query, keep_blank_values=True) if name == key]
    return found[-1] if found else None


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _unsupported(media: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"unsupported media type {media or '(none)'!r}: send the image as the multipart/form-data field 'file' "
        f"or as the raw body with one of {sorted(MEDIA_TYPES)} (formats: {', '.join(FORMATS)})",
    )


async def read_body(request: Request) -> bytes:
    """The whole body; a client that hangs up while sending is ClientGone, not a server error."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise ClientGone from None


def image_reader(request: Request) -> Callable[[], Awaitable[bytes]]:
    """The call that reads the image; the media type is checked now, before any admission."""
    content_type = request.headers.get("content-type")
    media = _media_type(content_type)
    if media in MEDIA_TYPES:
        return partial(read_body, request)
    if media != "multipart/form-data":
        raise _unsupported(media)

    async def from_multipart() -> bytes:
        try:
            part = await read_part(content_type or "", request.stream(), "file")
        except ClientDisconnect:
            raise ClientGone from None
        if part is None:
            raise InvalidParameter("the multipart body needs a file part named 'file'")
        data, part_type = part
        part_media = _media_type(part_type)
        if part_media and part_media != OCTET_STREAM and part_media not in MEDIA_TYPES:
            raise _unsupported(part_media)
        return data

    return from_multipart


def disconnect(request: Request) -> Callable[[], Awaitable[None]]:
    """Returns, once awaited, when the server reports the connection gone (the body was already
    read, so the next message can only be the disconnect)."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return gone
