"""Scenarios 3 and 4 at the log level: append-to-reader latency and fan-out.

A producer appends stamped events at a fixed rate; readers subscribed before
the first append record when each event reaches them. Readers run either in
the producer's process (woken by the committer, no query needed) or in a
second process on the same database (woken by the SQLite poll or Postgres
NOTIFY, one read per wake-up per stream). `value` is the database queries per
event made by the readers' process: the design promises one per event per
process at most, however many readers.

The HTTP versions (`http_readers`) run the service (`streamkeep serve`) with
SSE readers of /v1/streams/{id}/events in separate processes (bench/sse.py),
and a producer that appends over HTTP: latency there runs from the start of the
append's POST to the reader decoding its frame, and `value` is the service's
own tail reads per event (its /metrics).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import aiohttp

from app.log import StreamManager, StreamWriter, create_manager
from bench.context import Context
from bench.loadgen import HttpServer, start_streamkeep
from bench.procs import Child, cpu_seconds
from bench.readers import Figures, QueryCounter, Readers
from bench.results import Result, Target
from bench.sse import (
    SseFigures,
    SseLoad,
    SseReaders,
    counted_since,
    create_streams,
    produce_over_http,
    service_metrics,
    service_session,
    wait_for_live_readers,
)
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
    # A copy: the counter's wrappers stay on the store and would go on counting the
    # next case's queries into this case's JSON.
    return events, readers.figures(dict(counter.counts))


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
    return [*results, *await http_readers(ctx)]


@dataclass(frozen=True)
class SseCase:
    scenario: str
    key: str
    readers: int
    rate: float  # events per second
    targets: list[Target]
    processes: int = 1  # reader processes (the load generator must not be the bottleneck)

    def title(self, readers: int) -> str:
        who = "1 SSE reader" if readers == 1 else f"{readers:,} SSE readers"
        return f"{who} over HTTP, HTTP producer, {self.rate:.0f} events/s"


SSE_CASES = [
    SseCase(LATENCY_SCENARIO, "latency/sse", 1, 500, LATENCY_TARGETS),
    SseCase(FANOUT_SCENARIO, "fanout/sse-500", 500, 50, FANOUT_TARGETS),
    SseCase(FANOUT_SCENARIO, "fanout/sse-1000", 1000, 50, []),
]


async def http_readers(ctx: Context) -> list[Result]:
    """The SSE versions of scenarios 3 and 4, against the service itself."""
    seconds = ctx.size(10.0, 0.5)
    results = []
    server = await start_streamkeep(ctx.database_url)
    try:
        async with service_session(server.base_url) as session:
            for case in SSE_CASES:
                if ctx.smoke and case.readers > 500:
                    continue
                readers = ctx.size(case.readers, min(case.readers, 20))
                result = await _sse_case(ctx, server, session, case, readers, seconds)
                results.append(result)
                print(f"  {case.key}: p99 {result.p99_ms or 0:.1f} ms", file=sys.stderr)
    finally:
        await server.stop()
    return results


async def _sse_case(
    ctx: Context,
    server: HttpServer,
    session: aiohttp.ClientSession,
    case: SseCase,
    readers: int,
    seconds: float,
) -> Result:
    load = SseLoad(case.key.replace("/", "-") + "-", 1, readers)
    [stream_id] = load.stream_ids
    await create_streams(session, [stream_id])
    sse = await SseReaders.start(
        server.base_url, load, case.processes, ctx.scratch, within=seconds + 120
    )
    try:
        await sse.connected(within=120)
        await wait_for_live_readers(session, readers, within=60)
        before = await service_metrics(session)
        pids = (server.pid, os.getpid())  # the service, and the producer (this process)
        cpu_before, started = [cpu_seconds(p) for p in pids], time.monotonic()
        events, failed = await produce_over_http(session, stream_id, case.rate, seconds)
        figures = await sse.finish(within=seconds + 120)
        wall = time.monotonic() - started
        used = [cpu_seconds(p) - b for p, b in zip(pids, cpu_before, strict=True)]
        after = await service_metrics(session)
    finally:
        await sse.stop()
    figures.queries = counted_since(before, after, ("tail_reads", "wakeups"))
    cpu = {"service": used[0] / wall, "readers": figures.cpu / wall, "producer": used[1] / wall}
    return _sse_result(case, readers, events, failed, figures, cpu)


def _sse_result(
    case: SseCase,
    readers: int,
    events: int,
    failed: int,
    figures: SseFigures,
    cpu: dict[str, float],  # share of one core over the run, by process
) -> Result:
    expected = events * readers
    complete = figures.deliveries == expected and figures.in_order and not figures.failures
    processes = "" if case.processes == 1 else f" ({case.processes} processes)"
    busy = (
        f"CPU: service {cpu['service']:.0%}, SSE readers {cpu['readers']:.0%}{processes}, "
        f"producer {cpu['producer']:.0%}"
    )
    if complete and not failed:
        what = f"{events:,} events, all delivered in order"
    else:
        what = (
            f"DELIVERY BROKEN: {figures.deliveries:,} of {expected:,}, in order: "
            f"{figures.in_order}, failed appends {failed}, failed readers {figures.failures} "
            f"{figures.first_failure}"
        )
    return Result(
        case.scenario,
        case.title(readers),
        case.key,
        # The terminal event is read like the others.
        value=figures.queries["tail_reads"] / (events + 1),
        unit="queries/event",
        p50_ms=figures.p50_ms,
        p99_ms=figures.p99_ms,
        targets=case.targets,
        status="ok" if complete and not failed else "failed",
        note=f"{what}; {busy}",
        extra={
            "events": events,
            "deliveries": figures.deliveries,
            "queries": figures.queries,
            "cpu": {name: round(share, 2) for name, share in cpu.items()},
            "reader_processes": case.processes,
        },
    )
