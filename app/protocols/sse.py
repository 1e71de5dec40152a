"""Helpers shared by the SSE protocols: keepalives on a subscription, the response itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final, TypeVar, cast

from litestar import Request
from litestar.response import ServerSentEventMessage, Stream

from app.protocols import closing_body

T = TypeVar("T")

_END: Final = object()

# What Litestar's ServerSentEvent sends, for a body of ready-made bytes.
SSE_HEADERS = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}
KEEPALIVE = ServerSentEventMessage(comment="keepalive", data=None).encode()


async def _next(items: AsyncIterator[T]) -> T | object:
    try:
        return await anext(items)
    except StopAsyncIteration:
        return _END


async def with_keepalives(items: AsyncIterator[T], every: float) -> AsyncIterator[T | None]:
    """The subscription's items, and None whenever `every` seconds pass without one.

    The pending read is never cancelled by a keepalive tick (that would close the
    subscription); it is cancelled only when the caller stops, and the
    subscription is then closed at once so its reader is unregistered.
    """
    pending: asyncio.Task[T | object] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.create_task(_next(items))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            item = pending.result()
            pending = None
            if item is _END:
                return
            yield cast(T, item)
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved: it ended on its own, nobody wants it now
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


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
