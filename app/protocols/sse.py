"""Helpers shared by the SSE protocols: the keepalive comment and the response itself."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from litestar import Request
from litestar.response import ServerSentEventMessage, Stream

from app.log import Event
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


class SharedFrames:
    """One encoding of events to bytes, remembered for the events seen last in this process.

    Every local reader of a stream gets the same Event objects from its tail,
    so with many readers of one stream each event is encoded once, not once
    per reader: per-reader encoding was over a quarter of the service's CPU
    with 1,000 SSE readers of one stream. An entry holds its event, so the
    event's id() cannot be reused while it is cached. Only events of up to
    `max_payload` bytes are kept, which bounds what the cache holds (with the
    defaults about 2.5 MB of events and frames at most, per encoding).
    """

    def __init__(
        self, encode: Callable[[Event], bytes], entries: int = 256, max_payload: int = 4096
    ) -> None:
        self._encode = encode
        self._entries = entries
        self._max_payload = max_payload
        self._recent: OrderedDict[int, tuple[Event, bytes]] = OrderedDict()

    def __call__(self, event: Event) -> bytes:
        recent = self._recent
        hit = recent.get(id(event))
        if hit is not None and hit[0] is event:
            return hit[1]
        frame = self._encode(event)
        if len(event.payload) <= self._max_payload:
            if len(recent) >= self._entries:
                # One call, so atomic: apps on several threads' loops (tests run
                # servers side by side) share these caches.
                with contextlib.suppress(KeyError):
                    recent.popitem(last=False)  # the oldest entry
            recent[id(event)] = (event, frame)
        return frame
