"""Errors shared by the log and every protocol.

Status names follow Genkit (and gRPC), so that every wire protocol maps a
failure the same way: the flow endpoint puts the name in its error frame,
the HTTP protocols turn it into a status code with `http_status`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Status(StrEnum):
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"


# Genkit's own table (js/core statusTypes), so our HTTP codes match its servers.
_HTTP_STATUS: dict[Status, int] = {
    Status.CANCELLED: 499,
    Status.UNKNOWN: 500,
    Status.INVALID_ARGUMENT: 400,
    Status.DEADLINE_EXCEEDED: 504,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.PERMISSION_DENIED: 403,
    Status.UNAUTHENTICATED: 401,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.FAILED_PRECONDITION: 400,
    Status.ABORTED: 409,
    Status.OUT_OF_RANGE: 400,
    Status.UNIMPLEMENTED: 501,
    Status.INTERNAL: 500,
    Status.UNAVAILABLE: 503,
    Status.DATA_LOSS: 500,
}


# What a 503 tells clients: try again after this many seconds (the database is
# restarting, SQLite is locked, the service is shutting down).
RETRY_AFTER_SECONDS = 2


def retry_headers(status_code: int) -> dict[str, str]:
    """Headers for an error answer: a 503 says when to try again."""
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if status_code == 503 else {}


def http_status(status: Status | StreamError) -> int:
    """The HTTP status for a status name, or for an error (which may name its own)."""
    if isinstance(status, StreamError):
        return status.http or _HTTP_STATUS[status.status]
    return _HTTP_STATUS[status]


class StreamError(Exception):
    """A failure with a status name, a public message and optional details."""

    def __init__(
        self, status: Status, message: str, details: Any = None, *, http: int | None = None
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.details = details
        # An HTTP status more precise than the status name's (413 for a too-large event).
        self.http = http

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": str(self.status), "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> StreamError:
        try:
            status = Status(body.get("status", "UNKNOWN"))
        except ValueError:
            status = Status.UNKNOWN
        return cls(status, str(body.get("message", "")), body.get("details"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StreamError):
            return NotImplemented
        return (self.status, self.message, self.details) == (
            other.status,
            other.message,
            other.details,
        )

    def __hash__(self) -> int:
        return hash((self.status, self.message))


def not_found(stream_id: str) -> StreamError:
    return StreamError(Status.NOT_FOUND, f"stream {stream_id!r} not found")


def too_large(what: str, size: int, limit: int) -> StreamError:
    return StreamError(
        Status.RESOURCE_EXHAUSTED,
        f"{what} is {size} bytes, more than the limit of {limit} bytes",
        {"limit": limit},
        http=413,
    )
