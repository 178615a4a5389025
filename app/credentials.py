"""``cnnserve token`` and ``cnnserve key``: the credentials app/serving/access.py accepts, made on
the command line.

- ``cnnserve token --scope infer --ttl 10m`` prints a JWT a backend hands its page: signed HS256
  with CNNSERVE_JWT_SECRET (or RS256/ES256 with ``--private-key`` and the ``--kid`` its JWKS names),
  for CNNSERVE_JWT_AUDIENCE, expiring after the TTL, with the scopes and an optional rate.
- ``cnnserve key --name ci --scope read --scope infer`` prints a fresh random key, then the
  ``[[key]]`` entry (its SHA-256, never the key) to append to CNNSERVE_KEYS_FILE.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Any

import jwt

from app.config import Settings
from app.serving.access import SCOPES, new_key

TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d``."""
    found = TTL.match(text.strip())
    if found is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 10m, 2h)")
    return float(found.group(1)) * UNITS[found.group(2)]


def add_commands(commands: Any) -> None:
    token = commands.add_parser("token", help="print a bearer token (JWT) for a page or a client")
    token.add_argument("--scope", action="append", choices=SCOPES, required=True, help="repeat for several")
    token.add_argument("--ttl", type=seconds, default=seconds("10m"), help="lifetime: 30s, 10m, 2h (default 10m)")
    token.add_argument("--subject", default="page", help="the sub claim: who it is for (default page)")
    token.add_argument("--rate", type=float, help="its own rate limit, requests a second")
    token.add_argument("--burst", type=float, help="its own burst")
    token.add_argument("--private-key", type=Path, help="PEM key to sign with (RS256/ES256) instead of the secret")
    token.add_argument("--kid", help="the key's id in the service's JWKS (with --private-key)")
    token.add_argument("--algorithm", default="RS256", help="with --private-key: RS256 (default) or ES256")
    key = commands.add_parser("key", help="print a new API key and its entry for CNNSERVE_KEYS_FILE")
    key.add_argument("--name", required=True, help="the key's name, in logs and metrics")
    key.add_argument("--scope", action="append", choices=SCOPES, required=True, help="repeat for several")
    key.add_argument("--rate", type=float, help="requests a second")
    key.add_argument("--burst", type=float, help="requests at once")
    key.add_argument("--expires", help="when it stops working, ISO 8601: 2027-01-01T00:00:00Z")


def mint(args: argparse.Namespace, settings: Settings) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": args.subject,
        "aud": settings.jwt_audience,
        "scope": " ".join(args.scope),
        "iat": now,
        "exp": now + int(args.ttl),
    }
    claims |= {name: value for name in ("rate", "burst") if (value := getattr(args, name)) is not None}
    if args.private_key is not None:
        headers = {"kid": args.kid} if args.kid else None
        return jwt.encode(claims, args.private_key.read_bytes(), algorithm=args.algorithm, headers=headers)
    if settings.jwt_secret is None:
        raise SystemExit("cnnserve token: set CNNSERVE_JWT_SECRET (or give --private-key)")
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm="HS256")


def run_token(args: argparse.Namespace) -> int:
    print(mint(args, Settings()))
    return 0


def run_key(args: argparse.Namespace) -> int:
    secret = new_key()
    lines = [
        "[[key]]",
        f'name = "{args.name}"',
        f'sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"',
        "scopes = [" + ", ".join(f'"{scope}"' for scope in args.scope) + "]",
    ]
    lines += [f"{name} = {value}" for name in ("rate", "burst") if (value := getattr(args, name)) is not None]
    if args.expires:
        lines.append(f"expires = {args.expires}")
    print(secret)
    print("\n".join(lines), file=sys.stderr)
    return 0
