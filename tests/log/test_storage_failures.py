"""A storage failure reaches the producer; nothing is dropped silently."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
from sqlalchemy.exc import DBAPIError

from app.errors import Status, StreamError
from app.log import MemoryStore, StreamManager, create_manager
from app.log.db import normalize_url
from app.log.sql import storage_error

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


RESTARTING = [
    asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
]


@pytest.mark.parametrize("error", RESTARTING, ids=lambda e: type(e).__name__)
def test_bug_postgres_restarting_was_a_500_not_a_503(error: asyncpg.PostgresError) -> None:
    """Found by tests/test_faults.py: while Postgres shut down or started up, appends
    and reads failed with "the database system is shutting down" (SQLSTATE 57P03),
    which SQLAlchemy wraps as a plain `Error`: it was INTERNAL (HTTP 500) instead of
    UNAVAILABLE (503 with Retry-After), so clients were told not to retry."""
    adapted = AsyncAdapt_asyncpg_dbapi.Error(str(error), error)  # type: ignore[no-untyped-call]
    wrapped = DBAPIError("SELECT 1", None, adapted)
    for raised in (error, wrapped):  # from the driver itself, or through SQLAlchemy
        assert storage_error(raised).status is Status.UNAVAILABLE


def test_a_bad_statement_stays_internal() -> None:
    error = asyncpg.exceptions.UndefinedTableError('relation "events" does not exist')
    adapted = AsyncAdapt_asyncpg_dbapi.Error(str(error), error)  # type: ignore[no-untyped-call]
    wrapped = DBAPIError("SELECT 1", None, adapted)
    assert storage_error(wrapped).status is Status.INTERNAL


@pytest.mark.postgres
async def test_a_lost_postgres_connection_fails_once_and_is_not_handed_out_again(
    pg_url: str,
) -> None:
    """The pools do not ping on checkout; a connection killed under them must be
    discarded when it fails, not given to the next request and the one after.
    A read is run again on a new connection: it does not fail at all."""
    manager = create_manager(pg_url, pool_size=1)
    await manager.start()
    try:
        writer = await manager.open("s")
        await writer.write("before")
        await manager.read("s")  # the pool now holds the one connection, idle
        admin = await asyncpg.connect(
            normalize_url(pg_url).set(drivername="postgresql").render_as_string(False)
        )
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'streamkeep' AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        assert (await manager.info("s")).last_seq == 1  # a read: retried, no failure
        failures = 0
        for _ in range(3):
            try:
                await writer.write("after")
                break
            except StreamError as exc:
                assert exc.status is Status.UNAVAILABLE
                failures += 1
        assert failures <= 1
        assert [e.json() for e in await manager.read("s")] == ["before", "after"]
    finally:
        await manager.close()
