"""A stream's first local reader and what was committed while it read the stream's row.

A subscription reads the row, then makes the stream's tail, the thing commits
and wake-ups are handed to. Whatever arrives between the two finds no tail.
The in-memory store stands for a database read that returns a row from just
before a commit: it holds the row it read until the test lets it go.
"""

from __future__ import annotations

import asyncio

from app.log import EventKind, StreamInfo, StreamManager
from app.log.memory import MemoryNotifier, MemoryStore


class HeldRowStore(MemoryStore):
    """A MemoryStore whose `info` reads the row at once and returns it when released."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.release = asyncio.Event()

    async def info(self, stream_id: str) -> StreamInfo | None:
        row = await super().info(stream_id)
        if self.hold:
            await self.release.wait()
        return row


async def first_reader_while(
    store: HeldRowStore, manager: StreamManager
) -> asyncio.Task[list[tuple[int, EventKind]]]:
    """A reader of "s" after seq 1 whose read of the row is held."""

    async def read() -> list[tuple[int, EventKind]]:
        events = await manager.subscribe("s", after=1)
        return [(e.seq, e.kind) async for e in events]

    store.hold = True
    task = asyncio.create_task(read())
    for _ in range(5):
        await asyncio.sleep(0)
    return task


async def test_bug_first_reader_missed_a_commit_of_its_process_made_while_it_read_the_row() -> None:
    """The property test on Postgres timed out about once in 60 runs: a reader
    resuming at the head waited 30 s (the safety recheck) for a terminal event
    committed, and handed to no tail, while it read the row."""
    store = HeldRowStore()
    manager = StreamManager(store, notifier=MemoryNotifier(store))
    await manager.start()
    writer = await manager.open("s")
    await writer.write("x")
    reader = await first_reader_while(store, manager)
    await writer.done("ok")  # seq 2, committed after the row was read
    store.release.set()
    assert await asyncio.wait_for(reader, 5) == [(2, EventKind.DONE)]
    await manager.close()


async def test_bug_first_reader_missed_a_wakeup_from_elsewhere_while_it_read_the_row() -> None:
    store = HeldRowStore()
    reading = StreamManager(store, notifier=MemoryNotifier(store))
    writing = StreamManager(store, notifier=MemoryNotifier(store))
    for manager in (reading, writing):
        await manager.start()
    writer = await writing.open("s")
    await writer.write("x")
    reader = await first_reader_while(store, reading)
    await writer.done("ok")  # its wake-up reaches `reading` before any tail there
    store.release.set()
    assert await asyncio.wait_for(reader, 5) == [(2, EventKind.DONE)]
    for manager in (reading, writing):
        await manager.close()
