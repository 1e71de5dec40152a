"""Scenario 7 (part): RSS of idle readers.

The log-level figure: 1,000 subscribers, one per open stream, all waiting, in
this process. The SSE figure (the target) is the service's own RSS (`streamkeep
serve`) with 1,000 idle SSE readers of /v1/streams/{id}/events in another
process, again one per stream: the harder case, since every stream then has a
tail of its own besides the HTTP connection and response generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc

from app.log import StreamManager, create_manager
from bench.context import Context
from bench.loadgen import start_streamkeep
from bench.procs import rss_mb
from bench.results import Result, Target
from bench.sse import (
    SseLoad,
    SseReaders,
    create_streams,
    service_session,
    wait_for_live_readers,
)

SCENARIO = "7 memory"
TARGET = Target("value", "<=", 300, "<= 300 MB")


async def _idle_reader(manager: StreamManager, stream_id: str, ready: asyncio.Event) -> None:
    subscription = await manager.subscribe(stream_id)
    ready.set()
    async with contextlib.aclosing(subscription) as events:  # type: ignore[type-var]
        async for _ in events:
            pass


async def run(ctx: Context) -> list[Result]:
    readers = ctx.size(1_000, 50)
    async with create_manager(ctx.database_url) as manager:
        writers = [
            await manager.open(f"idle-{i}", idle_timeout_seconds=None) for i in range(readers)
        ]
        gc.collect()
        before = rss_mb()
        ready = [asyncio.Event() for _ in writers]
        tasks = [
            asyncio.create_task(_idle_reader(manager, w.stream_id, r))
            for w, r in zip(writers, ready, strict=True)
        ]
        await asyncio.gather(*(r.wait() for r in ready))
        await asyncio.sleep(0.1)
        gc.collect()
        after = rss_mb()
        await asyncio.gather(*(w.close() for w in writers))
        await asyncio.gather(*tasks)
    return [
        Result(
            SCENARIO,
            f"{readers:,} idle subscribers, 1 per stream (log level, no HTTP)",
            "memory/idle-subscribers",
            value=after,
            unit="MB",
            targets=[TARGET],
            note=f"{(after - before) * 1024 / readers:.1f} KB per reader over {before:.0f} MB",
            extra={"rss_before_mb": before, "rss_after_mb": after},
        ),
        await _idle_sse(ctx, readers),
    ]


async def _idle_sse(ctx: Context, readers: int) -> Result:
    """The service's RSS before and after `readers` SSE readers attach, one per open stream."""
    load = SseLoad("idle-sse-", readers, 1)
    server = await start_streamkeep(ctx.database_url)
    try:
        async with service_session(server.base_url) as session:
            await create_streams(session, load.stream_ids)
            before = rss_mb(server.pid)
            sse = await SseReaders.start(server.base_url, load, 1, ctx.scratch, within=600)
            try:
                connected = await sse.connected(within=120)
                await wait_for_live_readers(session, readers, within=60)
                await asyncio.sleep(1)  # let every response settle into its wait
                after = rss_mb(server.pid)
            finally:
                await sse.stop()
    finally:
        await server.stop()
    return Result(
        SCENARIO,
        f"{readers:,} idle SSE readers, 1 per stream (service RSS)",
        "memory/idle-sse",
        value=after,
        unit="MB",
        targets=[TARGET],
        status="ok" if connected == readers else "failed",
        note=f"{(after - before) * 1024 / readers:.1f} KB per reader over {before:.0f} MB "
        f"(the service with {readers:,} open streams); readers in another process",
        extra={"rss_before_mb": before, "rss_after_mb": after, "connected": connected},
    )
