"""Scenario 7 (part): RSS of idle readers.

Until the SSE routes land, the log-level figure: 1,000 subscribers, one per
open stream, all waiting, in this process. The SSE figure (the target) adds
the HTTP connections and response generators on top and is pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc

from app.log import StreamManager, create_manager
from bench.context import Context
from bench.procs import rss_mb
from bench.results import Result, Target, pending

SCENARIO = "7 memory"


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
            targets=[Target("value", "<=", 300, "<= 300 MB")],
            note=f"{(after - before) * 1024 / readers:.1f} KB per reader over {before:.0f} MB",
            extra={"rss_before_mb": before, "rss_after_mb": after},
        ),
        pending(
            SCENARIO,
            "1,000 idle SSE readers (service RSS)",
            "memory/idle-sse",
            "pending endpoint: SSE routes not on this branch",
        ),
    ]
