"""Who may do what: credentials, their scopes and their rate limits, for every protocol.

A request presents at most one secret (an adapter takes it from a header or from metadata) and
needs one scope:

- ``read``: models, metadata, layers, kernels, exemplars, the API's documentation;
- ``infer``: classify, V2 infer, feature maps, CAM, preprocess, the model's input tensor;
- ``explain``: /explain, whose methods cost up to hundreds of forward passes;
- ``admin``: the repository API (load, unload, index) and /metrics.

The secret is one of three kinds, tried in this order:

- ``CNNSERVE_API_KEY``: one key with every scope (the single key of earlier versions);
- a named key of ``CNNSERVE_KEYS_FILE``, stored as its SHA-256 (the keys are random, 256 bits:
  a slow hash would add nothing but latency), with its scopes and optional rate, burst and expiry.
  The file is read again when it changes (checked at most every RELOAD_CHECK_S), whole or not at
  all: a file that does not parse leaves the keys as they were, and requests never see a half-read
  file, so a key valid before and after a rotation never fails;
- a JWT bearer token (PyJWT) signed with ``CNNSERVE_JWT_SECRET`` (HS256) or a key of
  ``CNNSERVE_JWT_JWKS_FILE`` (RS256, ES256; chosen by ``kid``), with ``exp`` and ``aud`` required,
  ``nbf`` honoured, scopes in ``scope`` (space-separated) and an optional ``rate`` and ``burst``.
  The algorithm must match the kind of key: an HS256 token is checked only against the secret, an
  RS256 one only against a public key, ``none`` never.

With none of the three configured, the service is open (every request has every scope) and the
rate limit, if any, counts per client address. Refusals are ServingErrors: 401 (no credential, or
one unknown, expired or forged), 403 (a scope missing), 429 (over the rate limit, from
app/serving/ratelimit.py). Each is logged on ``cnnserve.audit`` with the credential's name, never
its secret, and counted by reason; each admitted request is counted by credential name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import jwt

from app.config import Settings
from app.metrics import Metrics
from app.serving.errors import Forbidden, RateLimited, ServingError, Unauthorized
from app.serving.ratelimit import Buckets, Decision, Limit

log = logging.getLogger("cnnserve.audit")

Scope = Literal["read", "infer", "explain", "admin"]
SCOPES: Final[tuple[Scope, ...]] = ("read", "infer", "explain", "admin")
OPEN: Final = "open"  # what a probe or the page needs: nothing
RELOAD_CHECK_S = 0.5
VERIFIED_TOKENS = 4096  # tokens remembered as verified, per process
ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "PS256"})
POLICY = "cnnserve"
ALL: frozenset[str] = frozenset(SCOPES)


@dataclass(frozen=True)
class Credential:
    """Who a request is: ``name`` (never the secret), what it may do, and its own limit if any.
    ``label`` is what metrics call it: a key's name, or ``token`` for every token (the subjects of
    tokens are unbounded)."""

    name: str
    scopes: frozenset[str]
    limit: Limit | None = None
    label: str = ""

    @property
    def metric_label(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Grant:
    """An admitted request: its credential and, when a limit applies, the bucket's state."""

    credential: Credential
    decision: Decision | None = None
    limit: Limit | None = None

    def headers(self) -> dict[str, str]:
        """The IETF RateLimit-Policy and RateLimit fields (draft-ietf-httpapi-ratelimit-headers)."""
        if self.decision is None or self.limit is None:
            return {}
        return rate_headers(self.limit, self.decision)


def rate_headers(limit: Limit, decision: Decision) -> dict[str, str]:
    headers = {
        "RateLimit-Policy": f'"{POLICY}";q={int(limit.burst)};w={limit.window_s}',
        "RateLimit": f'"{POLICY}";r={decision.remaining};t={decision.reset_s}',
    }
    if not decision.allowed:
        headers["Retry-After"] = str(decision.retry_after_s)
    return headers


@dataclass(frozen=True)
class KeyRecord:
    credential: Credential
    digest: bytes
    expires: float | None  # seconds since the epoch


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_expiry(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value)).timestamp()


def parse_keys(text: str) -> dict[bytes, KeyRecord]:
    """The keys of a keys file, by digest; ValueError (with the key's name) on the first bad entry."""
    records: dict[bytes, KeyRecord] = {}
    for entry in tomllib.loads(text).get("key", []):
        name = str(entry.get("name", ""))
        scopes = frozenset(entry.get("scopes", []))
        if not name or scopes - ALL:
            raise ValueError(f"key {name!r}: a name and scopes among {', '.join(SCOPES)} are needed")
        digest = bytes.fromhex(str(entry["sha256"]))
        if len(digest) != hashlib.sha256().digest_size:
            raise ValueError(f"key {name!r}: sha256 must be 64 hex digits")
        limit = limit_of(entry.get("rate"), entry.get("burst"))
        records[digest] = KeyRecord(Credential(name, scopes, limit), digest, parse_expiry(entry.get("expires")))
    return records


def limit_of(rate: object, burst: object) -> Limit | None:
    if rate is None:
        return None
    per_second = float(rate)  # type: ignore[arg-type]
    if per_second <= 0:
        raise ValueError("a rate must be above 0")
    return Limit(per_second, float(burst) if burst is not None else max(1.0, per_second))  # type: ignore[arg-type]


@dataclass
class KeysFile:
    """The named keys, read again when the file's size, time or inode change."""

    path: Path
    records: dict[bytes, KeyRecord] = field(default_factory=dict)
    signature: tuple[int, int, int] | None = None
    next_check: float = 0.0

    def __post_init__(self) -> None:
        self.reload()
        if self.signature is None:
            raise ValueError(f"cannot read the keys file {self.path}")

    def lookup(self, secret: str) -> KeyRecord | None:
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + RELOAD_CHECK_S
            self.reload()
        record = self.records.get(digest_of(secret))
        return record if record is not None and hmac.compare_digest(record.digest, digest_of(secret)) else None

    def reload(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError as error:
            log.error(
                "keys file %s unreadable (%s); keeping the %d key(s) read before", self.path, error, len(self.records)
            )
            return
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature == self.signature:
            return
        try:
            records = parse_keys(self.path.read_text())
        except (OSError, ValueError, KeyError, tomllib.TOMLDecodeError) as error:
            log.error(
                "keys file %s refused (%s); keeping the %d key(s) read before", self.path, error, len(self.records)
            )
            return
        self.records, self.signature = records, signature
        log.info("keys file %s: %d key(s)", self.path, len(records))


class Tokens:
    """JWT bearer tokens: HS256 against the secret, asymmetric algorithms against the JWKS."""

    def __init__(self, secret: str | None, jwks_file: Path | None, audience: str) -> None:
        self.secret = secret
        self.audience = audience
        self.keys: dict[str, jwt.PyJWK] = {}
        self.verified: dict[str, tuple[Credential, float]] = {}
        if jwks_file is not None:
            for key in jwt.PyJWKSet.from_dict(json.loads(jwks_file.read_text())).keys:
                if key.algorithm_name not in ASYMMETRIC:
                    raise ValueError(f"JWKS key {key.key_id!r}: only RS/ES/PS keys belong in a public key set")
                self.keys[key.key_id or ""] = key

    def verify(self, token: str) -> Credential:
        """The token's credential; a token verified before is looked up, not verified again (PyJWT
        takes about 70 us a token, a lookup under 1 us), until its ``exp``."""
        known = self.verified.get(token)
        if known is not None and time.time() < known[1]:
            return known[0]
        credential, expires = self.decode(token)
        if len(self.verified) >= VERIFIED_TOKENS:
            self.verified.clear()
        self.verified[token] = (credential, expires)
        return credential

    def decode(self, token: str) -> tuple[Credential, float]:
        try:
            header = jwt.get_unverified_header(token)
            algorithm, key = self.key_for(header)
            claims = jwt.decode(
                token, key, algorithms=[algorithm], audience=self.audience, options={"require": ["exp", "aud"]}
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired", "expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the token is not valid yet", "not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(f"the token is not for audience {self.audience}", "wrong_audience") from None
        except jwt.InvalidTokenError as error:
            raise Unauthorized(f"invalid token: {error}", "invalid_token") from None
        return credential_of(claims), float(claims["exp"])

    def key_for(self, header: Mapping[str, Any]) -> tuple[str, Any]:
        algorithm = str(header.get("alg", ""))
        if algorithm == "HS256" and self.secret is not None:
            return algorithm, self.secret
        if algorithm in ASYMMETRIC and self.keys:
            key = self.keys.get(str(header.get("kid", ""))) or (
                next(iter(self.keys.values())) if len(self.keys) == 1 else None
            )
            if key is not None and key.algorithm_name == algorithm:
                return algorithm, key.key
        raise jwt.InvalidAlgorithmError(f"algorithm {algorithm!r} with this key is not accepted")


def credential_of(claims: Mapping[str, Any]) -> Credential:
    scopes = frozenset(str(claims.get("scope", "")).split()) & ALL
    try:
        limit = limit_of(claims.get("rate"), claims.get("burst"))
    except (TypeError, ValueError):
        raise Unauthorized("invalid token: rate and burst must be positive numbers", "invalid_token") from None
    return Credential(f"token:{claims.get('sub', '')}", scopes, limit, label="token")


def looks_like_jwt(secret: str) -> bool:
    return secret.count(".") == 2


class Access:
    """The one decision of every protocol: ``admit(secret, scope, client)`` -> a Grant, or a refusal."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, buckets: Buckets | None = None) -> None:
        master = settings.api_key.get_secret_value() if settings.api_key else None
        self.master = digest_of(master) if master else None
        self.keys = KeysFile(settings.keys_file) if settings.keys_file else None
        secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self.tokens = (
            Tokens(secret, settings.jwt_jwks_file, settings.jwt_audience) if secret or settings.jwt_jwks_file else None
        )
        self.enabled = bool(self.master or self.keys or self.tokens)
        self.default_limit = default_limit(settings)
        self.buckets = buckets or Buckets()
        self.metrics = metrics

    def admit(self, secret: str | None, scope: str, client: str, action: str = "") -> Grant:
        """Who presents ``secret``, allowed ``scope``, within its rate: a Grant, or the refusal
        (logged and counted). ``client`` is the peer's address, ``action`` what it asked for."""
        credential: Credential | None = None
        try:
            credential = self.identify(secret, client)
            if scope not in credential.scopes:
                raise Forbidden(credential.name, scope)
            grant = self.within_limit(credential)
        except ServingError as refusal:
            self.refused(refusal, credential, client, action)
            raise
        self.count(credential, scope, client, action)
        return grant

    def identify(self, secret: str | None, client: str) -> Credential:
        if not self.enabled:
            return Credential(f"client:{client}", ALL, label="anonymous")
        if not secret:
            raise Unauthorized(
                "an API key or token is needed: 'Authorization: Bearer KEY_OR_TOKEN' or 'X-API-Key: KEY'"
            )
        if self.master is not None and hmac.compare_digest(digest_of(secret), self.master):
            return Credential("api-key", ALL)
        record = self.keys.lookup(secret) if self.keys else None
        if record is not None:
            if record.expires is not None and time.time() >= record.expires:
                raise Unauthorized(f"key {record.credential.name!r} has expired", "expired")
            return record.credential
        if self.tokens is not None and looks_like_jwt(secret):
            return self.tokens.verify(secret)
        raise Unauthorized("unknown key or token", "unknown")

    def within_limit(self, credential: Credential) -> Grant:
        limit = credential.limit or self.default_limit
        if limit is None:
            return Grant(credential)
        decision = self.buckets.take(credential.name, limit)
        if not decision.allowed:
            raise RateLimited(credential.name, rate_headers(limit, decision))
        return Grant(credential, decision, limit)

    def refused(self, refusal: ServingError, credential: Credential | None, client: str, action: str) -> None:
        reason = getattr(refusal, "reason", None) or {403: "insufficient_scope", 429: "rate_limited"}.get(
            refusal.status, "refused"
        )
        name = credential.name if credential else "-"
        level = logging.DEBUG if reason == "rate_limited" else logging.WARNING  # a flood's 429s: counted, not logged
        log.log(
            level, "refused %s: credential=%s client=%s reason=%s (%s)", action, name, client, reason, refusal.message
        )
        if self.metrics is not None:
            self.metrics.access_refusals.labels(reason).inc()

    def count(self, credential: Credential, scope: str, client: str, action: str) -> None:
        if scope == "admin" and not action.startswith("GET "):  # a scrape of /metrics is no action
            log.info("admin %s: credential=%s client=%s", action, credential.name, client)
        if self.metrics is not None and self.enabled:
            self.metrics.credential_requests.labels(credential.metric_label).inc()


def default_limit(settings: Settings) -> Limit | None:
    if settings.rate_limit <= 0:
        return None
    return Limit(settings.rate_limit, float(settings.rate_burst or max(1, round(settings.rate_limit))))


def new_key() -> str:
    """A fresh random key (256 bits), as ``cnnserve key`` prints it."""
    return "cns_" + os.urandom(32).hex()
