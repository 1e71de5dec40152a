"""Demo flows, always registered: try reconnection with curl in a minute."""

from __future__ import annotations

import asyncio
from typing import Any

from app.errors import Status, StreamError
from app.flows import SendChunk, flow

MAX_COUNT = 1_000_000


def _countdown_input(data: Any) -> tuple[int, float]:
    data = data if data is not None else {}
    if not isinstance(data, dict):
        raise StreamError(Status.INVALID_ARGUMENT, 'input must be an object like {"count": 5}')
    count, delay_ms = data.get("count", 5), data.get("delay_ms", 0)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_COUNT:
        raise StreamError(
            Status.INVALID_ARGUMENT, f"count must be an integer from 0 to {MAX_COUNT}"
        )
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int | float) or delay_ms < 0:
        raise StreamError(Status.INVALID_ARGUMENT, "delay_ms must be a non-negative number")
    return count, delay_ms / 1000


async def _count_down(count: int, delay: float, send_chunk: SendChunk, stop_after: int) -> None:
    for sent, n in enumerate(range(count, 0, -1)):
        if sent >= stop_after:
            return
        if sent and delay:
            await asyncio.sleep(delay)
        send_chunk(n)


@flow
async def countdown(data: Any, send_chunk: SendChunk) -> str:
    """{"count": N, "delay_ms": D}: sends N, N-1, ..., 1 with D ms between them."""
    count, delay = _countdown_input(data)
    await _count_down(count, delay, send_chunk, count)
    return f"countdown from {count} done"


@flow
async def fail_midway(data: Any, send_chunk: SendChunk) -> str:
    """Like countdown, but fails after the first half of the chunks."""
    count, delay = _countdown_input(data)
    half = count // 2
    await _count_down(count, delay, send_chunk, half)
    if delay:
        await asyncio.sleep(delay)
    raise StreamError(Status.INTERNAL, f"fail_midway: failed after {half} of {count} chunks")
