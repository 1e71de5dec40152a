"""Deleting a stream deletes its event rows, on every SQL backend.

Events have no foreign key to streams since migration 0004 (it was most of
the cost of a flow's commit on Postgres), so nothing cascades: each way a
stream goes must take its rows itself, or the table grows forever with rows
nobody can read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from app.log import ForkSpec, StreamManager, create_manager
from app.log.db import normalize_url
from app.migrate import migration_engine
from tests.support import FakeClock


@pytest.fixture
async def manager(shared_url: str, clock: FakeClock) -> AsyncIterator[StreamManager]:
    manager = create_manager(shared_url, clock=clock, ttl_seconds=60)
    await manager.start()
    yield manager
    await manager.close()


async def rows_of(url: str, stream_id: str) -> int:
    engine = migration_engine(normalize_url(url))
    try:
        async with engine.connect() as conn:
            query = text("SELECT count(*) FROM events WHERE stream_id = :id")
            return int((await conn.execute(query, {"id": stream_id})).scalar_one())
    finally:
        await engine.dispose()


async def finished_stream(manager: StreamManager, stream_id: str, events: int = 3) -> None:
    writer = await manager.open(stream_id)
    for n in range(events):
        await writer.write(n)
    await writer.done("end")


async def test_delete_takes_the_rows(manager: StreamManager, shared_url: str) -> None:
    await finished_stream(manager, "s")
    assert await rows_of(shared_url, "s") == 4
    assert await manager.delete("s")
    assert await rows_of(shared_url, "s") == 0


async def test_sweep_takes_the_rows_of_small_and_large_streams(
    shared_url: str, clock: FakeClock
) -> None:
    # batch size 5: the large stream loses its rows in ranges first.
    manager = create_manager(shared_url, clock=clock, ttl_seconds=60, sweep_batch_size=5)
    await manager.start()
    try:
        await finished_stream(manager, "small", 2)
        await finished_stream(manager, "large", 12)
        clock.advance(61)
        report = await manager.sweep()
        assert report.deleted_streams == 2
        assert await rows_of(shared_url, "small") == 0
        assert await rows_of(shared_url, "large") == 0
    finally:
        await manager.close()


async def test_a_fork_keeps_its_source_rows_until_it_goes(
    manager: StreamManager, shared_url: str
) -> None:
    await finished_stream(manager, "source")
    await manager.create("fork", fork=ForkSpec("source", 2))
    assert await manager.delete("source")
    assert await rows_of(shared_url, "source") == 4  # the fork still reads them
    assert await manager.delete("fork")
    assert await rows_of(shared_url, "source") == 0


async def test_an_expired_id_created_again_starts_without_old_rows(
    manager: StreamManager, shared_url: str, clock: FakeClock
) -> None:
    await finished_stream(manager, "s", 5)
    clock.advance(61)
    writer = await manager.open("s")
    await writer.write("new")
    assert await rows_of(shared_url, "s") == 1
    assert [e.json() for e in await manager.read("s")] == ["new"]
