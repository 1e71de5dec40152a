"""A producer in its own OS process: python -m tests.log.producer_process URL ID COUNT DELAY_MS."""

from __future__ import annotations

import asyncio
import sys

from app.log import create_manager


async def produce(url: str, stream_id: str, count: int, delay: float) -> None:
    async with create_manager(url) as manager:
        writer = manager.writer(stream_id)
        for i in range(count):
            await writer.write({"n": i, "pid": "child"})
            await asyncio.sleep(delay)
        await writer.done({"written": count})


if __name__ == "__main__":
    url, stream_id, count, delay_ms = sys.argv[1:5]
    asyncio.run(produce(url, stream_id, int(count), int(delay_ms) / 1000))
