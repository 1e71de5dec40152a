"""Flows that only the tests register (through STREAMKEEP_FLOWS)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from app.flows import SendChunk, flow

# Set by a test (another thread than the server's) to let `gated` start.
gate = threading.Event()


@flow
async def gated(data: Any, send_chunk: SendChunk) -> str:
    """Sends nothing until the test opens the gate, then one chunk."""
    await asyncio.to_thread(gate.wait, 30)
    send_chunk("through")
    return "gated done"


@flow
async def echo(data: Any, send_chunk: SendChunk) -> Any:
    send_chunk(data)
    return data


@flow
async def leaky(data: Any, send_chunk: SendChunk) -> Any:
    """Raises a plain exception whose text must not reach clients."""
    send_chunk("before")
    raise RuntimeError("secret database password in a traceback")


@flow
async def unserialisable_output(data: Any, send_chunk: SendChunk) -> Any:
    return object()


@flow
async def forever(data: Any, send_chunk: SendChunk) -> Any:
    """Streams until it is cancelled (service shutdown)."""
    n = 0
    while True:
        send_chunk(n)
        n += 1
        await asyncio.sleep(0.02)


second_step = threading.Event()


@flow
async def two_steps(data: Any, send_chunk: SendChunk) -> str:
    """One chunk at once, the next only when the test says so (to see buffering)."""
    send_chunk("first")
    await asyncio.to_thread(second_step.wait, 30)
    send_chunk("second")
    return "two steps done"


@flow
async def firehose(data: Any, send_chunk: SendChunk) -> int:
    """{"count": N, "size": bytes, "pause_ms": ms}: N chunks of `size` characters."""
    count, size = int(data["count"]), int(data["size"])
    pause = data.get("pause_ms", 1) / 1000
    for n in range(count):
        send_chunk(f"{n:08d}" + "x" * max(size - 8, 0))
        if n % 10 == 0:
            await asyncio.sleep(pause)
    return count
