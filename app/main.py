"""``uvicorn app.main:app`` serves one process with every CPU, configured by the environment.

The app is built when uvicorn asks for it, not when this module is imported (importing builds
nothing). The factory form says the same explicitly: ``uvicorn --factory app.main:create_app``.
"""

from __future__ import annotations

from functools import cache

from fastapi import FastAPI

from app.http.app import create_app

__all__ = ["create_app"]


@cache
def _app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> FastAPI:
    if name == "app":
        return _app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
