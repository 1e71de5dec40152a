"""A storage failure reaches the producer; nothing is dropped silently."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from app.errors import Status, StreamError
from app.log import MemoryStore, StreamManager
from app.log.db import normalize_url

Breaker = Callable[[bool], Awaitable[None]]


@pytest.fixture
def break_storage(database_url: str, manager: StreamManager) -> Breaker:
    """break_storage(True) makes appends fail for real; break_storage(False) repairs."""

    async def toggle(broken: bool) -> None:
        old, new = ("events", "events_away") if broken else ("events_away", "events")
        if database_url == "memory":
            assert isinstance(manager.store, MemoryStore)
            if broken:
                manager.store.fail_next_commit(OSError("disk unplugged"))
            return
        url = normalize_url(database_url)
        if url.get_backend_name() == "sqlite":
            with sqlite3.connect(url.database or "") as conn:
                conn.execute(f"ALTER TABLE {old} RENAME TO {new}")
            return
        conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(False))
        try:
            await conn.execute(f"ALTER TABLE {old} RENAME TO {new}")
        finally:
            await conn.close()

    return toggle


async def test_storage_failure_during_write_reaches_the_writer(
    manager: StreamManager, break_storage: Breaker, database_url: str
) -> None:
    writer = await manager.open("s")
    await writer.write("before")
    await break_storage(True)
    with pytest.raises(StreamError) as err:
        await writer.write("lost?")
    assert err.value.status in (Status.UNAVAILABLE, Status.INTERNAL)
    assert err.value.__cause__ is not None or database_url == "memory"
    if database_url != "memory":
        await break_storage(False)
    # Nothing half-written: the failed chunk is absent and numbering continues.
    after = await writer.write("after")
    assert after.seq == 2
    assert [e.json() for e in await manager.read("s")] == ["before", "after"]


async def test_storage_failure_fails_every_append_of_the_batch(
    manager: StreamManager, break_storage: Breaker, database_url: str
) -> None:
    writer = await manager.open("s")
    await break_storage(True)
    futures = [writer.send(i) for i in range(10)]
    for future in futures:
        with pytest.raises(StreamError):
            await future
    if database_url != "memory":
        await break_storage(False)
    assert (await manager.info("s")).last_seq == 0


async def test_a_failed_push_is_raised_by_flush_and_the_next_push(
    manager: StreamManager, break_storage: Breaker, database_url: str
) -> None:
    writer = await manager.open("s")
    await break_storage(True)
    writer.push("lost")
    with pytest.raises(StreamError):
        await writer.flush()
    with pytest.raises(StreamError):
        writer.push("after the failure")
    if database_url != "memory":
        await break_storage(False)
