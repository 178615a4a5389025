"""A client that hangs up must not cost an inference: race the work against the connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before the answer


class ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the server reports the connection gone (the body was already read, so the
    next message can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of ``work``, or ClientGone with ``work`` cancelled (a queued inference is then
    dropped before it runs)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise ClientGone
    finally:
        watcher.cancel()
