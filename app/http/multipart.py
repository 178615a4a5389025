"""The image part of a multipart/form-data body, parsed in memory with python-multipart.

Starlette's form parser writes every file part to a SpooledTemporaryFile behind an UploadFile, and
the route then read it all back into memory: 39 us of a LeNet-5 request's 380 us, against 11 us
for python-multipart's parser alone. The body is already bounded by the body limit, so the part
is collected in memory directly. The other bounds stay those of the form parser: few parts, small
text parts, and python-multipart's own limits on part headers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from app.serving.errors import BadRequest, PayloadTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks  # defined for type checkers only

MAX_PARTS = 8
MAX_TEXT_PART_BYTES = 64 * 1024


@dataclass(slots=True)
class _Part:
    disposition: bytes = b""
    content_type: bytes = b""
    name: str = ""
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False


class _Collector:
    """python-multipart's callbacks: keeps the part named ``wanted`` and bounds the others."""

    def __init__(self, wanted: str) -> None:
        self.wanted = wanted
        self.found: _Part | None = None
        self.parts = 0
        self.part = _Part()
        self.header = self.value = b""  # the part header being read

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BadRequest(f"the multipart body has more than {MAX_PARTS} parts")
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        header = self.header.lower()
        if header == b"content-disposition":
            self.part.disposition = self.value
        elif header == b"content-type":
            self.part.content_type = self.value
        self.header = self.value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        if b"name" not in options:
            raise BadRequest("a multipart part has no Content-Disposition name")
        self.part.name = options[b"name"].decode("utf-8", "replace")
        if self.part.name == self.wanted:
            if self.found is not None:
                raise BadRequest(f"the multipart body has more than one part named {self.wanted!r}")
            self.found = self.part

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.part.data += data[start:end]
        if self.part is not self.found and len(self.part.data) > MAX_TEXT_PART_BYTES:
            raise PayloadTooLarge(f"the multipart part {self.part.name!r} is over {MAX_TEXT_PART_BYTES} bytes")

    def on_part_end(self) -> None:
        self.part.ended = True


async def read_part(content_type: str, stream: AsyncIterator[bytes], name: str) -> tuple[bytes, str] | None:
    """The data and media type of the part called ``name``, or None if there is none. Unlike
    python-multipart's finalize(), refuses a body that ends inside that part."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("the multipart/form-data content type has no boundary")
    collector = _Collector(name)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as error:
        raise BadRequest(f"invalid multipart body: {error}") from None
    part = collector.found
    if part is None:
        return None
    if not part.ended:
        raise BadRequest(f"the multipart body ends inside the part {name!r}")
    return bytes(part.data), part.content_type.decode("latin-1")
