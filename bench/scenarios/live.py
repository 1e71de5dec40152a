"""Scenarios 3 and 4 at the log level: append-to-reader latency and fan-out.

A producer appends stamped events at a fixed rate; readers subscribed before
the first append record when each event reaches them. Readers run either in
the producer's process (woken by the committer, no query needed) or in a
second process on the same database (woken by the SQLite poll or Postgres
NOTIFY, one read per wake-up per stream). `value` is the database queries per
event made by the readers' process: the design promises one per event per
process at most, however many readers.

The HTTP versions (SSE readers of /v1/streams/{id}/events and Durable Streams
live=sse) are listed as pending until those routes exist: see `http_readers`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from app.log import StreamManager, StreamWriter, create_manager
from bench.context import Context
from bench.procs import Child
from bench.readers import Figures, QueryCounter, Readers
from bench.results import Result, Target, pending
from bench.workload import paced, stamped

LATENCY_SCENARIO = "3 append-to-reader latency"
FANOUT_SCENARIO = "4 fan-out"
LATENCY_TARGETS = [
    Target("p50_ms", "<=", 2.0, "p50 <= 2 ms"),
    Target("p99_ms", "<=", 10.0, "p99 <= 10 ms"),
]
FANOUT_TARGETS = [
    Target("p99_ms", "<=", 150.0, "p99 <= 150 ms"),
    Target("value", "<=", 1.0, "<= 1 query/event"),
]


@dataclass(frozen=True)
class LiveCase:
    scenario: str
    key: str
    readers: int
    rate: float  # events per second
    cross_process: bool
    targets: list[Target]

    @property
    def title(self) -> str:
        where = "second process" if self.cross_process else "in process"
        who = "1 reader" if self.readers == 1 else f"{self.readers:,} readers"
        return f"{who} {where}, {self.rate:.0f} events/s"


CASES = [
    LiveCase(LATENCY_SCENARIO, "latency/in-process", 1, 500, False, LATENCY_TARGETS),
    LiveCase(LATENCY_SCENARIO, "latency/cross-process", 1, 500, True, LATENCY_TARGETS),
    LiveCase(FANOUT_SCENARIO, "fanout/500-in-process", 500, 50, False, FANOUT_TARGETS),
    LiveCase(FANOUT_SCENARIO, "fanout/1000-in-process", 1000, 50, False, []),
    LiveCase(FANOUT_SCENARIO, "fanout/500-cross-process", 500, 50, True, FANOUT_TARGETS),
    LiveCase(FANOUT_SCENARIO, "fanout/1000-cross-process", 1000, 50, True, []),
]


async def _produce(writer: StreamWriter, rate: float, seconds: float) -> int:
    async def append(n: int) -> None:
        await writer.write(stamped(n))

    count = await paced(rate, seconds, append)
    await writer.done({"events": count})
    return count


async def _in_process(
    manager: StreamManager, writer: StreamWriter, case: LiveCase, seconds: float
) -> tuple[int, Figures]:
    counter = QueryCounter(manager)
    readers = Readers(manager, writer.stream_id, case.readers)
    await readers.start()
    counter.reset()
    events = await _produce(writer, case.rate, seconds)
    await readers.finish(within=60)
    return events, readers.figures(counter.counts)


async def _cross_process(
    ctx: Context, writer: StreamWriter, case: LiveCase, seconds: float
) -> tuple[int, Figures]:
    child = await Child.start(
        "readers",
        "-m",
        "bench.readers",
        ctx.database_url,
        writer.stream_id,
        str(case.readers),
        str(seconds + 60),
        python=True,
    )
    try:
        await child.message(within=120)  # every reader attached
        events = await _produce(writer, case.rate, seconds)
        figures = Figures(**await child.message(within=seconds + 90))
    finally:
        await child.stop()
    return events, figures


def _result(case: LiveCase, events: int, figures: Figures) -> Result:
    expected = events * case.readers
    complete = figures.deliveries == expected and figures.in_order
    queries = sum(figures.queries.values())
    return Result(
        case.scenario,
        case.title,
        case.key,
        # The terminal event is an event too: it is read like the others.
        value=queries / (events + 1),
        unit="queries/event",
        p50_ms=figures.p50_ms,
        p99_ms=figures.p99_ms,
        targets=case.targets,
        status="ok" if complete else "failed",
        note=(
            f"{events:,} events, all delivered in order"
            if complete
            else f"DELIVERY BROKEN: {figures.deliveries:,} of {expected:,}, "
            f"in order: {figures.in_order}"
        ),
        extra={"events": events, "deliveries": figures.deliveries, "queries": figures.queries},
    )


async def run(ctx: Context) -> list[Result]:
    seconds = ctx.size(10.0, 0.5)
    results = []
    async with create_manager(ctx.database_url) as manager:
        for n, case in enumerate(CASES):
            if ctx.smoke and case.readers > 500:
                continue  # the 500-reader cases already check that fan-out works
            writer = await manager.open(f"live-{n}", idle_timeout_seconds=None)
            if case.cross_process:
                events, figures = await _cross_process(ctx, writer, case, seconds)
            else:
                events, figures = await _in_process(manager, writer, case, seconds)
            results.append(_result(case, events, figures))
            print(f"  {case.key}: p99 {figures.p99_ms:.1f} ms", file=sys.stderr)
    return [*results, *http_readers()]


def http_readers() -> list[Result]:
    """The SSE versions of scenarios 3 and 4: pending until the read routes land.

    To add them: start the service (bench.loadgen.start_streamkeep), run SSE
    clients in a second process that feed every decoded event to
    bench.readers.Readers.received, and append through the log or HTTP.
    """
    why = "pending endpoint: SSE routes (/v1/streams/{id}/events, live=sse) not on this branch"
    return [
        pending(LATENCY_SCENARIO, "SSE reader over HTTP, 500 events/s", "latency/sse", why),
        pending(FANOUT_SCENARIO, "500 / 1,000 SSE readers, 50 events/s", "fanout/sse", why),
    ]
