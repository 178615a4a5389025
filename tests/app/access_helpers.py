"""What the access-control tests share: keys files, keys and tokens made as a deployment makes them."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import jwt

SCOPES = ("read", "infer", "explain", "admin")
AUDIENCE = "cnnserve"
SECRET = "a-secret-of-the-backend-at-least-32-bytes-long"


def new_key(label: str) -> str:
    return f"cns_{label}_{os.urandom(16).hex()}"


def entry(name: str, key: str, scopes: list[str], **extra: object) -> str:
    """One ``[[key]]`` table of a keys file (TOML)."""
    lines = [
        "[[key]]",
        f'name = "{name}"',
        f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"',
        "scopes = [" + ", ".join(f'"{s}"' for s in scopes) + "]",
    ]
    lines += [f"{field} = {value}" for field, value in extra.items()]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """As a deployment should rotate: write beside, then rename over (readers see old or new, whole)."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(text)
    scratch.replace(path)


def token(scope: str, *, ttl: float = 600, secret: str = SECRET, **claims: object) -> str:
    now = time.time()
    body = {"sub": "page", "aud": AUDIENCE, "scope": scope, "iat": int(now), "exp": now + ttl, **claims}
    return jwt.encode(body, secret, algorithm="HS256")
