"""Scenarios 6 and 7 (part): sweeping a million expired events while producers append,
and the process's RSS before, after writing and after sweeping.

Streams are opened with ttl_seconds=0, so they expire the moment they finish;
the sweep then deletes them in bounded transactions (the manager's
sweep_batch_size) while a few producers keep appending at a steady rate. Their
append latency before and during the sweep shows what the sweep costs them.
The whole scenario runs in its own process, so RSS is this manager's alone.
A second million is then written and swept: RSS must not grow from one
million to the next (what the first burst allocated is reused, not leaked).
"""

from __future__ import annotations

import asyncio
import gc
import time

from app.log import StreamManager, StreamWriter, create_manager
from bench.context import Context
from bench.procs import peak_rss_mb, rss_mb
from bench.results import Result, Target, latency_fields
from bench.workload import event

SWEEP_SCENARIO = "6 sweep"
MEMORY_SCENARIO = "7 memory"
PRODUCERS = 8
PRODUCER_RATE = 100  # events/s each
FILL_CONCURRENCY = 50  # streams written at once while filling
# The second write-and-sweep cycle may end this far above the first (noise, caches).
RSS_GROWTH_SLACK_MB = 8


async def _write_stream(writer: StreamWriter, events: int) -> None:
    await asyncio.gather(*(writer.send(event(n)) for n in range(events - 1)))
    await writer.done({"events": events})


async def _fill(manager: StreamManager, streams: int, per_stream: int, prefix: str) -> float:
    started = time.perf_counter()
    for first in range(0, streams, FILL_CONCURRENCY):
        ids = range(first, min(streams, first + FILL_CONCURRENCY))
        writers = [
            await manager.open(f"{prefix}-{i}", ttl_seconds=0, idle_timeout_seconds=None)
            for i in ids
        ]
        await asyncio.gather(*(_write_stream(w, per_stream) for w in writers))
    return streams * per_stream / (time.perf_counter() - started)


class Producers:
    """Appenders at a steady rate that record (start time, latency) of every write."""

    def __init__(self, writers: list[StreamWriter]) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._produce(w)) for w in writers]

    async def _produce(self, writer: StreamWriter) -> None:
        t0, n = time.monotonic(), 0
        while not self._stop.is_set():
            started = time.monotonic()
            await writer.write(event(n))
            self.samples.append((started, time.monotonic() - started))
            n += 1
            await asyncio.sleep(max(0.0, t0 + n / PRODUCER_RATE - time.monotonic()))

    def between(self, start: float, end: float) -> list[float]:
        return [latency for t, latency in self.samples if start <= t < end]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def _settled_rss() -> float:
    gc.collect()
    return rss_mb()


async def run(ctx: Context) -> list[Result]:
    streams, per_stream = ctx.size((1_000, 1_000), (20, 50))
    total = streams * per_stream
    async with create_manager(ctx.database_url) as manager:
        rss_start = _settled_rss()
        fill_rate = await _fill(manager, streams, per_stream, "expired")
        rss_written = _settled_rss()
        writers = [
            await manager.open(f"producer-{i}", idle_timeout_seconds=None) for i in range(PRODUCERS)
        ]
        producers = Producers(writers)
        baseline_start = time.monotonic()
        await asyncio.sleep(ctx.size(3.0, 0.3))
        sweep_start = time.monotonic()
        report = await manager.sweep()
        sweep_end = time.monotonic()
        await asyncio.sleep(0.2)
        await producers.stop()
        rss_swept = _settled_rss()
        await _fill(manager, streams, per_stream, "again")
        second = await manager.sweep()
        rss_second = _settled_rss()
    for deleted in (report.deleted_events, second.deleted_events):
        if deleted != total:
            raise RuntimeError(f"sweep deleted {deleted} of {total} events")
    sweep_seconds = sweep_end - sweep_start
    load = f"{PRODUCERS} producers at {PRODUCERS * PRODUCER_RATE} events/s"
    return [
        Result(
            SWEEP_SCENARIO,
            f"delete {total:,} events of {streams:,} expired streams, {load}",
            "sweep/during",
            value=sweep_seconds,
            unit="s",
            **latency_fields(producers.between(sweep_start, sweep_end)),
            note=f"{total / sweep_seconds:,.0f} events/s deleted; p50/p99: producers' appends",
            extra={"deleted_events": report.deleted_events, "fill_events_per_s": round(fill_rate)},
        ),
        Result(
            SWEEP_SCENARIO,
            f"same producers before the sweep ({load})",
            "sweep/baseline",
            **latency_fields(producers.between(baseline_start, sweep_start)),
            note="p50/p99: producers' appends without a sweep",
        ),
        Result(
            MEMORY_SCENARIO,
            f"RSS after {total:,} events written and swept (in-process manager)",
            "memory/after-sweep",
            value=rss_swept,
            unit="MB",
            note=f"start {rss_start:.0f} MB, after writing {rss_written:.0f}, "
            f"peak {peak_rss_mb():.0f}",
            extra={
                "rss_start_mb": rss_start,
                "rss_written_mb": rss_written,
                "rss_peak_mb": peak_rss_mb(),
            },
        ),
        Result(
            MEMORY_SCENARIO,
            f"RSS after another {total:,} events written and swept",
            "memory/after-second-sweep",
            value=rss_second,
            unit="MB",
            targets=[Target("value", "<=", rss_swept + RSS_GROWTH_SLACK_MB, "no growth (+8 MB)")],
            note=f"{rss_second - rss_swept:+.1f} MB over the first cycle",
        ),
    ]
