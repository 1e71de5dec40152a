"""A producer in its own OS process that pauses at a gate the test opens.

python -m tests.protocols.gated_producer URL STREAM_ID COUNT GATE_AT

Writes COUNT typed events {"i": i} (type "tick") straight through the log API,
waits after the first GATE_AT of them until a line arrives on stdin, then ends
the stream with done({"count": COUNT}). The gate makes "the stream is still
running" a fact the test controls, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
import sys

from app.log import create_manager

GATE_WAIT_SECONDS = 60


async def wait_for_gate() -> None:
    await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), GATE_WAIT_SECONDS)


async def produce(url: str, stream_id: str, count: int, gate_at: int) -> None:
    async with create_manager(url) as manager:
        writer = manager.writer(stream_id)
        for i in range(count):
            if i == gate_at:
                await wait_for_gate()
            await writer.write({"i": i}, type="tick")
        await writer.done({"count": count})


if __name__ == "__main__":
    url, stream_id, count, gate_at = sys.argv[1:5]
    asyncio.run(produce(url, stream_id, int(count), int(gate_at)))
