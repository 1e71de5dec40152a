"""Helpers shared by the SSE protocols: keepalives on a subscription, comment frames."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

from litestar.response import ServerSentEventMessage

from app.log import Event

_END: Final = object()


async def _next(events: AsyncIterator[Event]) -> Event | object:
    try:
        return await anext(events)
    except StopAsyncIteration:
        return _END


async def with_keepalives(
    events: AsyncIterator[Event], every: float
) -> AsyncIterator[Event | None]:
    """The subscription's events, and None whenever `every` seconds pass without one.

    The pending read is never cancelled by a keepalive tick (that would close the
    subscription); it is cancelled only when the caller stops, and the
    subscription is then closed at once so its reader is unregistered.
    """
    pending: asyncio.Task[Event | object] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.create_task(_next(events))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            item = pending.result()
            pending = None
            if item is _END:
                return
            assert isinstance(item, Event)
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved: it ended on its own, nobody wants it now
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def keepalive() -> ServerSentEventMessage:
    """A comment-only frame: keeps proxies from cutting an idle stream, dispatches nothing."""
    return ServerSentEventMessage(comment="keepalive", data=None)
