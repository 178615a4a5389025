"""One error base for everything a request can fail on, with the status a client can act on.

The status travels with the error, as in MLServer's ``MLServerError``: the core raises these
without knowing which protocol will carry them, and each adapter renders them once (HTTP as
``{"detail": ...}`` or, under ``/v2``, ``{"error": ...}``; gRPC would map the status to a code).
Anything that is not a ServingError is our own fault and becomes a 500.
"""

from __future__ import annotations

from collections.abc import Mapping

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before the answer


class ServingError(Exception):
    """A request that cannot be answered as asked; ``status`` says why, ``headers`` how to retry."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled as it is, not rebuilt through ``__init__`` (whose arguments differ by class):
        an error crosses processes when a Ray replica raises it and its ingress answers it."""
        return _restore, (type(self), self.args, self.__dict__)


def _restore(kind: type[ServingError], args: tuple[object, ...], state: dict[str, object]) -> ServingError:
    error = kind.__new__(kind)
    error.args = args
    error.__dict__.update(state)
    return error


class BadRequest(ServingError):
    """The request is malformed: an undecodable image, a broken multipart body, a wrong tensor."""


class Unauthorized(ServingError):
    """No credential, or one that is not (or no longer) valid; ``reason`` is counted and logged.
    The challenge is RFC 6750's: ``error="invalid_token"`` when a credential was presented."""

    status = 401

    def __init__(self, message: str, reason: str = "missing") -> None:
        challenge = 'Bearer realm="cnnserve"'
        if reason != "missing":
            description = message.replace('"', "'")
            challenge += f', error="invalid_token", error_description="{description}"'
        super().__init__(message, headers={"WWW-Authenticate": challenge})
        self.reason = reason


class Forbidden(ServingError):
    """A valid credential without the scope the request needs."""

    status = 403

    def __init__(self, credential: str, scope: str) -> None:
        super().__init__(
            f"credential {credential!r} lacks the scope {scope!r} this request needs",
            headers={"WWW-Authenticate": f'Bearer realm="cnnserve", error="insufficient_scope", scope="{scope}"'},
        )
        self.scope = scope


class NotFound(ServingError):
    """An unknown model, version or layer, or a view a model does not offer."""

    status = 404


class RequestTimeout(ServingError):
    """The client took longer to send its request than a request may wait."""

    status = 408


class PayloadTooLarge(ServingError):
    status = 413


class UnsupportedMediaType(ServingError):
    status = 415


class InvalidParameter(ServingError):
    """A well-formed request whose parameters this model or these settings do not allow."""

    status = 422


class Overloaded(ServingError):
    """The model holds all it may: the client should come back after ``retry_after`` seconds."""

    status = 429

    def __init__(self, model: str, retry_after: int) -> None:
        super().__init__(
            f"model {model!r} is at capacity; retry after {retry_after} s", headers={"Retry-After": str(retry_after)}
        )
        self.retry_after = retry_after


class RateLimited(ServingError):
    """The client spent its rate limit: it should come back after Retry-After seconds."""

    status = 429

    def __init__(self, credential: str, headers: Mapping[str, str]) -> None:
        super().__init__(f"credential {credential!r} is over its rate limit; retry after Retry-After", headers=headers)


class ClientGone(ServingError):
    """The client closed the connection; nobody reads the answer, which is only logged and counted."""

    status = CLIENT_CLOSED_REQUEST

    def __init__(self) -> None:
        super().__init__("the client closed the connection")


class Unavailable(ServingError):
    """The model exists but cannot answer now: refused at load, still loading, or past a deadline."""

    status = 503


class DeadlineExceeded(Unavailable):
    """The request waited in the queue past its deadline and was dropped unrun."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})
