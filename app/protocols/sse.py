"""Helpers shared by the SSE protocols: the keepalive comment and the response itself."""

from __future__ import annotations

from collections.abc import AsyncIterator

from litestar import Request
from litestar.response import ServerSentEventMessage, Stream

from app.protocols import closing_body

# What Litestar's ServerSentEvent sends, for a body of ready-made bytes.
SSE_HEADERS = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}
KEEPALIVE = ServerSentEventMessage(comment="keepalive", data=None).encode()


def sse_response(
    request: Request,  # type: ignore[type-arg]
    body: AsyncIterator[bytes],
    headers: dict[str, str] | None = None,
) -> Stream:
    """An SSE response whose body is written as it comes: one write per item.

    (Litestar's ServerSentEvent makes one write per message; a batch of events
    that is ready at once goes out here as one.) The body is closed when the
    response ends, however it ends (see closing_body).
    """
    return Stream(
        closing_body(request, body),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **(headers or {})},
    )
