"""Scenario 5: catch-up, reading a long finished stream from the start through the manager.

The stream is written first (pipelined, its rate is reported as a side
figure), then read by a fresh manager so that nothing is served from memory:
once through subscribe() as a resuming reader does, once by read() pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from app.log import Event, StreamManager, create_manager
from bench.context import Context
from bench.results import Result, Target
from bench.workload import event

SCENARIO = "5 catch-up (in process)"
STREAM = "catchup"
CATCH_UP_TARGET = Target("value", ">=", 300_000, ">= 300,000 events/s")


async def _fill(manager: StreamManager, events: int) -> float:
    writer = await manager.open(STREAM, idle_timeout_seconds=None)
    started = time.perf_counter()
    in_flight: deque[asyncio.Future[list[Event]]] = deque()
    for n in range(events - 1):
        in_flight.append(writer.send(event(n)))
        if len(in_flight) >= 1000:
            await in_flight.popleft()
    await asyncio.gather(*in_flight)
    await writer.done({"events": events})
    return events / (time.perf_counter() - started)


async def _subscribe_all(manager: StreamManager) -> tuple[int, float]:
    started = time.perf_counter()
    received = 0
    subscription = await manager.subscribe(STREAM, after=0)
    async with contextlib.aclosing(subscription) as events:  # type: ignore[type-var]
        async for _ in events:
            received += 1
    return received, time.perf_counter() - started


async def _read_pages(manager: StreamManager) -> tuple[int, float]:
    started = time.perf_counter()
    received, cursor = 0, 0
    while True:
        page: list[Event] = await manager.read(STREAM, after=cursor)
        received += len(page)
        if not page or page[-1].is_terminal:
            break
        cursor = page[-1].seq
    return received, time.perf_counter() - started


async def run(ctx: Context) -> list[Result]:
    events = ctx.size(100_000, 2_000)
    async with create_manager(ctx.database_url) as writer_side:
        fill_rate = await _fill(writer_side, events)
    results = []
    for case, key, read in (
        ("subscribe() from 0", "subscribe", _subscribe_all),
        ("read() pages of 1,000", "read-pages", _read_pages),
    ):
        async with create_manager(ctx.database_url) as reader_side:
            received, seconds = await read(reader_side)
        if received != events:
            raise RuntimeError(f"catch-up {case} got {received} of {events} events")
        results.append(
            Result(
                SCENARIO,
                f"{case}, {events:,} events",
                f"catchup/{key}",
                value=received / seconds,
                unit="events/s",
                targets=[CATCH_UP_TARGET],
                extra={"events": events, "fill_events_per_s": round(fill_rate)},
            )
        )
    return results
