"""The work every scenario does: small JSON events like LLM token deltas, paced producers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

# About the size of one streamed LLM token delta with a little metadata.
SMALL_EVENT: dict[str, Any] = {"delta": "hello", "index": 0, "model": "bench"}
SMALL_EVENT_BYTES = b'{"delta":"hello","index":0,"model":"bench"}'


def event(n: int) -> dict[str, Any]:
    return {"delta": "hello", "index": n, "model": "bench"}


def stamped(n: int) -> dict[str, Any]:
    """An event carrying the time it was handed to the log.

    time.monotonic() is CLOCK_MONOTONIC on Linux, shared by all processes of
    the machine, so a reader in another process can compute the latency too.
    """
    return {"delta": "hello", "index": n, "t": time.monotonic()}


async def paced(
    rate: float, seconds: float, step: Callable[[int], Awaitable[None]], *, start: float = 0.0
) -> int:
    """Call step(0), step(1), ... at `rate` per second for `seconds`, without drift.

    A step that overruns its slot delays the next one only; the schedule is
    absolute, so a slow moment does not lower the average rate.
    """
    t0 = start or time.monotonic()
    count = int(rate * seconds)
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await step(i)
    return count


def until(seconds: float) -> Callable[[], bool]:
    """A predicate that stays true for `seconds` from now (time-bounded loops)."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() < deadline
