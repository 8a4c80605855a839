"""Exceptions raised by the riftmesh client.

Every exception derives from :class:`RiftmeshError`:

* :class:`AgentUnavailable`: nothing answered at the agent's address (it is not
  running, or it listens elsewhere). ``address`` is the address that was tried.
* :class:`RiftmeshTimeout`: the agent did not answer in time.
* :class:`ApiError`: the agent answered with a 4xx or 5xx status. ``status`` is
  the HTTP status and ``message`` the agent's own error text. 4xx answers are
  :class:`ClientError` (with :class:`BadRequest`, :class:`Unauthorized`, :class:`NotFound`,
  :class:`Conflict`, :class:`PayloadTooLarge` for the common ones), 5xx answers
  :class:`ServerError` (:class:`Unavailable` for 503).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

__all__ = [
    "RiftmeshError",
    "AgentUnavailable",
    "RiftmeshTimeout",
    "ApiError",
    "ClientError",
    "BadRequest",
    "Unauthorized",
    "NotFound",
    "Conflict",
    "PayloadTooLarge",
    "ServerError",
    "Unavailable",
    "LockHeld",
    "LockLost",
    "BlobFetchError",
    "SpoolFull",
]


class RiftmeshError(Exception):
    """Base class of every error raised by this package."""


class AgentUnavailable(RiftmeshError, ConnectionError):
    """No agent answered at ``address``: it is not running or listens elsewhere."""

    def __init__(self, address: str, cause: Optional[BaseException] = None) -> None:
        self.address = address
        self.cause = cause
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(
            f"no riftmesh agent is answering at {address}{why}; start one with "
            "`riftmesh agent`, or point RIFTMESH_API / Client(api=...) at the "
            "address it listens on"
        )


class RiftmeshTimeout(RiftmeshError, TimeoutError):
    """The agent at ``address`` did not answer within ``timeout`` seconds."""

    def __init__(self, address: str, method: str, path: str, timeout: float) -> None:
        self.address = address
        self.method = method
        self.path = path
        self.timeout = timeout
        super().__init__(
            f"the riftmesh agent at {address} did not answer {method} {path} "
            f"within {timeout:g} s"
        )


class ApiError(RiftmeshError):
    """The agent answered with an error status.

    ``status`` is the HTTP status, ``message`` the agent's error message and
    ``body`` the whole decoded JSON answer (or ``None``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        method: str = "",
        path: str = "",
        body: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.status = status
        self.message = message
        self.method = method
        self.path = path
        self.body = body
        where = f" ({method} {path})" if method else ""
        super().__init__(f"{status}: {message}{where}")


class ClientError(ApiError):
    """A 4xx answer: the request was refused; the message says why."""


class BadRequest(ClientError):
    """400: a malformed request (bad type name, bad pattern, bad time ...)."""


class Unauthorized(ClientError):
    """401: the agent's API needs its token (``Client(token=...)`` or
    ``RIFTMESH_API_TOKEN_FILE``), or the one sent is not it."""


class NotFound(ClientError):
    """404: unknown consumer, event, blob or route."""


class Conflict(ClientError):
    """409: a lock is held by someone else, or a token no longer holds it."""


class PayloadTooLarge(ClientError):
    """413: the event or batch is over the agent's limits (send data as a blob)."""


class ServerError(ApiError):
    """A 5xx answer: the agent failed to do what was asked."""


class Unavailable(ServerError):
    """503: the agent cannot serve this now (no leader, network task stopped); retry."""


class LockHeld(Conflict):
    """The lock is held by ``holder`` with fencing token ``token`` until ``expires_ms``."""

    def __init__(self, err: ApiError) -> None:
        body = err.body or {}
        super().__init__(err.status, err.message, err.method, err.path, err.body)
        self.holder: Optional[str] = body.get("holder")
        self.token: Optional[int] = body.get("token")
        self.expires_ms: Optional[int] = body.get("expires_ms")


class LockLost(RiftmeshError):
    """A held lock could not be renewed: someone else may hold it now."""


class BlobFetchError(RiftmeshError):
    """The agent could not fetch a blob; ``reason`` is its last failure."""

    def __init__(self, ref: str, reason: str) -> None:
        self.ref = ref
        self.reason = reason
        super().__init__(f"fetching blob {ref!r} failed: {reason}")


class SpoolFull(RiftmeshError):
    """The local spool is at its bound: this publish was not kept (see riftmesh.spool)."""

    def __init__(self, directory: str, files: int, size: int, max_files: int, max_bytes: int) -> None:
        self.directory = directory
        super().__init__(
            f"the spool {directory} is full ({files} file(s), {size} bytes; at most {max_files} "
            f"files, {max_bytes} bytes): the publish was not spooled"
        )


_BY_STATUS: Dict[int, Type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    503: Unavailable,
}


def error_for(
    status: int,
    message: str,
    method: str = "",
    path: str = "",
    body: Optional[Dict[str, Any]] = None,
) -> ApiError:
    """The exception for an error answer with this status."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ClientError if 400 <= status < 500 else ServerError
    return cls(status, message, method, path, body)
