"""Scenario 2: append throughput through the StreamManager API, in process.

Every figure is committed events per second, as a ratio to the raw insert
loop of the same run. Sequential write() waits for each commit, so it can at
best reach the single-row limit (db-ceiling); the pipelined and concurrent
cases can fill group commits and are held to half the batched limit, the
batched loop measured again just before and just after each of them.
Those cases run once more on the in-memory store, which leaves the log's own
work per event (what a missed ratio is made of besides the database's).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from app.log import Event, StreamManager, StreamWriter, create_manager
from bench.context import Context
from bench.results import Result, Target
from bench.rounds import ROUNDS, Round, median_round, rounds_note
from bench.scenarios.ceilings import (
    AWAITED_16_ROWS_KEY,
    AWAITED_100_ROWS_KEY,
    AWAITED_100_STREAMS_KEY,
    BATCH_ROWS,
    DB_SCENARIO,
    RAW_BATCHED_KEY,
    RAW_SINGLE_KEY,
    batched_loop_rate,
)
from bench.workload import event, until

SCENARIO = "2 append (in process)"
# Chunks in flight, over all pipelined producers of a case: several group
# commits' worth (max_batch is 1,000), so that they keep submitting while the
# previous batch commits. As many per producer, 100 producers held a million
# appends in flight (futures, requests, events: peak RSS 470 MB against 195 on
# the in-memory store), and the log's own work per event rose from 5.3 to 8.8
# µs, in cache misses and collections: a load that measured the heap.
PIPELINE_WINDOW = 10_000
HALF_OF_BATCHED = Target("ratio", ">=", 0.5, ">= 0.50 of raw batched")


async def _open(manager: StreamManager, prefix: str, n: int) -> list[StreamWriter]:
    return [await manager.open(f"{prefix}-{i}", idle_timeout_seconds=None) for i in range(n)]


Producer = Callable[[StreamWriter, Callable[[], bool]], Awaitable[int]]


async def _sequential(writer: StreamWriter, running: Callable[[], bool]) -> int:
    written = 0
    while running():
        await writer.write(event(written))
        written += 1
    return written


def _pipelined(window: int) -> Producer:
    """A producer that send()s without waiting, up to `window` chunks in flight."""

    async def produce(writer: StreamWriter, running: Callable[[], bool]) -> int:
        in_flight: deque[asyncio.Future[list[Event]]] = deque()
        written = 0
        while running():
            in_flight.append(writer.send(event(written)))
            written += 1
            if len(in_flight) >= window:
                await in_flight.popleft()
        await asyncio.gather(*in_flight)
        return written

    return produce


class _Case(NamedTuple):
    name: str
    key: str
    writers: list[StreamWriter]
    producer: Producer
    ratio_to: str = RAW_BATCHED_KEY
    # The db-ceiling loop whose writers await the same commits (see Result.same_work_to).
    same_work_to: str | None = None


async def _measure(
    manager: StreamManager, writers: list[StreamWriter], producer: Producer, seconds: float
) -> float:
    """Events per second committed by one producer per writer (writers may repeat)."""
    await asyncio.gather(*(producer(w, until(0.2)) for w in set(writers)))  # warm-up
    started = time.perf_counter()
    running = until(seconds)
    counts = await asyncio.gather(*(producer(w, running) for w in writers))
    return sum(counts) / (time.perf_counter() - started)


async def _batched_loop(ctx: Context, when: str, seconds: float) -> float:
    """The raw batched loop's rows per second, into a stream of its own."""
    return await batched_loop_rate(ctx.db, ctx.database_url, when, seconds)


def _batched_around(case: _Case, median: Round[float, float]) -> Result:
    """The raw batched loop just before and just after the case's median round:
    what its ratio is to."""
    return Result(
        DB_SCENARIO,
        f"insert loop, {BATCH_ROWS} rows per commit, around: {case.name}",
        f"db-ceiling/around-{case.key}",
        value=median.ceiling,
        unit="rows/s",
        note=f"mean of {median.before:,.0f} just before and {median.after:,.0f} just after",
    )


def _cases(one: list[StreamWriter], hundred: list[StreamWriter]) -> list[_Case]:
    return [
        _Case("sequential write(), 1 stream", "sequential-1", one, _sequential, RAW_SINGLE_KEY),
        _Case("pipelined send(), 1 stream", "pipelined-1", one, _pipelined(PIPELINE_WINDOW)),
        _Case(
            "16 writers, 1 stream",
            "writers16-1",
            one * 16,
            _sequential,
            same_work_to=AWAITED_16_ROWS_KEY,
        ),
        _Case(
            "100 writers, 1 stream",
            "writers100-1",
            one * 100,
            _sequential,
            same_work_to=AWAITED_100_ROWS_KEY,
        ),
        _Case(
            "100 writers, 100 streams",
            "writers100-100",
            hundred,
            _sequential,
            same_work_to=AWAITED_100_STREAMS_KEY,
        ),
        _Case(
            "pipelined send(), 100 streams",
            "pipelined-100",
            hundred,
            _pipelined(PIPELINE_WINDOW // len(hundred)),
        ),
    ]


async def run(ctx: Context) -> list[Result]:
    seconds = ctx.size(3.0, 0.3)
    results: list[Result] = []
    # Per case held to the batched loop: its median round's rate and the loop's around it.
    measured: dict[str, tuple[float, float]] = {}
    async with create_manager(ctx.database_url) as manager:
        one = await _open(manager, "one", 1)
        hundred = await _open(manager, "hundred", 100)
        before: float | None = None
        for case in _cases(one, hundred):
            if case.ratio_to != RAW_BATCHED_KEY:
                rate = await _measure(manager, case.writers, case.producer, seconds)
                note = "ratio to raw 1-row commits" if case.ratio_to == RAW_SINGLE_KEY else ""
                results.append(_case_result(case, rate, case.ratio_to, note))
                continue
            if before is None:
                before = await _batched_loop(ctx, f"before-{case.key}", seconds)
            done = await _in_rounds(ctx, manager, case, seconds, before)
            before = done[-1].after
            median = median_round(done)
            around = _batched_around(case, median)
            measured[case.key] = (median.rate, median.ceiling)
            appended = _case_result(
                case, median.rate, around.key, rounds_note(done, "the batched loop")
            )
            appended.targets = [HALF_OF_BATCHED]
            appended.extra["rounds"] = [
                {"ratio": r.ratio, "events_per_second": r.rate, "loop_mean": r.ceiling}
                for r in done
            ]
            results += [around, appended]
    return results + await _without_database(measured, seconds)


async def _in_rounds(
    ctx: Context, manager: StreamManager, case: _Case, seconds: float, before: float
) -> list[Round[float, float]]:
    """The case's rounds, each followed by the batched loop (`before` is the
    loop's last run before the first)."""
    rounds: list[Round[float, float]] = []
    for number in range(ctx.size(ROUNDS, 1)):
        rate = await _measure(manager, case.writers, case.producer, seconds)
        after = await _batched_loop(ctx, f"after-{case.key}-{number}", seconds)
        rounds.append(Round(rate, before, after, rate, (before + after) / 2))
        before = after
    return rounds


def _case_result(case: _Case, rate: float, ratio_to: str, note: str) -> Result:
    return Result(
        SCENARIO,
        case.name,
        f"append/{case.key}",
        value=rate,
        unit="events/s",
        ratio_to=ratio_to,
        same_work_to=case.same_work_to,
        note=note,
    )


async def _without_database(
    measured: dict[str, tuple[float, float]], seconds: float
) -> list[Result]:
    """The cases held to the batched loop, again on the in-memory store: the
    log's own work per event (queue, futures, planning, settling), with no
    database behind it. On SQLite, whose commit runs on the event loop's
    thread, a case's time per event is about this plus the database's share;
    the note sets the three side by side."""
    results: list[Result] = []
    for key, (on_database, batched) in measured.items():
        # A store of its own per case: the in-memory store keeps every event
        # it was given, and a heap of earlier cases' events slows the next.
        async with create_manager("memory") as manager:
            one = await _open(manager, "one", 1)
            hundred = await _open(manager, "hundred", 100)
            [case] = [c for c in _cases(one, hundred) if c.key == key]
            rate = await _measure(manager, case.writers, case.producer, seconds)
        results.append(
            Result(
                SCENARIO,
                f"{case.name}, in-memory store (no database)",
                f"append/memory-{case.key}",
                value=rate,
                unit="events/s",
                note=(
                    f"the log's own work: {_micros(rate)} µs per event; the case on the "
                    f"database: {_micros(on_database)}; the batched loop around it: "
                    f"{_micros(batched)} per row"
                ),
            )
        )
    return results


def _micros(per_second: float) -> str:
    return f"{1e6 / per_second:.1f}" if per_second else "-"
